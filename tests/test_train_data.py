"""Training data: formats, assistant-only loss masks, packing, errors, and the resumable sampler."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmstack.tokenizer import Tokenizer
from lmstack.train.data import (IGNORE, DataError, ResumableSampler, collate_lm, load_sft, load_text,
                                to_messages, tokenize_conversation)
from tests.tok_fixtures import build_test_tokenizer
from tests.train_fixtures import write_jsonl, one_thread  # noqa: F401 (autouse fixture)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 12 * 34?"},
    {"role": "assistant", "content": "12 * 34 = 408."},
]
# What each chat style writes after an assistant message's content: the end-of-turn token (+ newline).
TURN_END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "</s>"}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {s: build_test_tokenizer(root / s, s) for s in TURN_END}


def _reference_mask(tok_dir: str, conv: list[dict], style: str) -> tuple[list[int], list[bool]]:
    """Independent reference: transformers renders and tokenizes (with character offsets); a token
    is a target iff it overlaps an assistant reply + that style's end-of-turn text (Mistral's
    template puts a space before the reply, which BPE merges into the reply's first token)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    text = hf.apply_chat_template(conv, tokenize=False)
    spans, pos = [], 0
    for m in conv:
        if m["role"] != "assistant":
            continue
        body = m["content"] + TURN_END[style]
        start = text.index(body, pos)
        spans.append((start, start + len(body)))
        pos = start + len(body)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_multiturn_mask_matches_reference(toks, style):
    tok = Tokenizer.from_dir(toks[style])
    conv = CONV  # (mistral folds the system message into the first user turn)
    ex = tokenize_conversation(tok, conv)
    ids, mask = _reference_mask(toks[style], conv, style)
    assert ex.ids == ids
    assert ex.targets == mask
    # Decoded target spans are exactly the two replies with their end-of-turn markers.
    spans, cur = [], []
    for i, t in zip(ex.ids, ex.targets):
        if t:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    got = [tok.decode(s, skip_special_tokens=False).lstrip(" ") for s in spans]
    assert got == [m["content"] + TURN_END[style] for m in conv if m["role"] == "assistant"]
    # End-of-turn tokens are trained on: the model learns to stop.
    eos = set(tok.eos_token_ids)
    assert sum(1 for i, t in zip(ex.ids, ex.targets) if t and i in eos) == 2


def test_collate_labels_are_shifted_targets(toks):
    tok = Tokenizer.from_dir(toks["chatml"])
    a = tokenize_conversation(tok, CONV)
    b = tokenize_conversation(tok, CONV[:3])
    batch = collate_lm([a, b], pad_id=0)
    assert batch["tokens"].shape == (2, len(a.ids))
    for row, ex in enumerate((a, b)):
        for t in range(batch["tokens"].shape[1]):
            want = ex.ids[t + 1] if t + 1 < len(ex.ids) and ex.targets[t + 1] else IGNORE
            assert int(batch["labels"][row, t]) == want
    assert batch["positions"][1].tolist() == list(range(len(a.ids)))


def test_formats_normalise_to_the_same_conversation(tmp_path, toks):
    tok = Tokenizer.from_dir(toks["chatml"])
    alpaca = {"system": "Be brief.", "history": [["What is 2 + 3?", "2 + 3 = 5."]], "instruction": "And 12 * 34?",
              "input": "", "output": "12 * 34 = 408."}
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CONV]}
    messages = {"messages": CONV}
    for rec, fmt in ((alpaca, "alpaca"), (sharegpt, "sharegpt"), (messages, "messages")):
        assert to_messages(rec, fmt, "x") == CONV
    path = write_jsonl(tmp_path / "mixed.jsonl", [alpaca, sharegpt, messages])
    exs, stats = load_sft([path], tok, max_len=512)
    assert len(exs) == 3 and exs[0] == exs[1] == exs[2]
    # alpaca `input` is appended to the instruction after a blank line
    m = to_messages({"instruction": "Sum:", "input": "1 2", "output": "3"}, "alpaca", "x")
    assert m == [{"role": "user", "content": "Sum:\n\n1 2"}, {"role": "assistant", "content": "3"}]


def test_csv_and_json_readers(tmp_path, toks):
    tok = Tokenizer.from_dir(toks["chatml"])
    (tmp_path / "d.csv").write_text('instruction,output,system\n"Say hi, please",Hi!,Be brief.\n')
    (tmp_path / "d.json").write_text('[{"instruction": "Say hi, please", "output": "Hi!", "system": "Be brief."}]')
    a, _ = load_sft([tmp_path / "d.csv"], tok, 256)
    b, _ = load_sft([tmp_path / "d.json"], tok, 256)
    assert a == b and len(a) == 1


def test_missing_column_names_file_line_and_column(tmp_path, toks):
    tok = Tokenizer.from_dir(toks["chatml"])
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing column 'output'"):
        load_sft([path], tok, 256)
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"txt": "hello"}])
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: missing column 'text'"):
        load_text([path], tok, 16)


def test_truncation_is_counted_and_empty_dataset_is_an_error(tmp_path, toks, caplog):
    tok = Tokenizer.from_dir(toks["chatml"])
    long = {"system": "Be brief.", "instruction": "Hi", "output": "word " * 200}
    path = write_jsonl(tmp_path / "long.jsonl", [long, long])
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        exs, stats = load_sft([path], tok, max_len=64)
    assert stats.truncated == 2 and all(len(e.ids) == 64 for e in exs)
    assert "2 of 2 examples were longer than max_len=64" in caplog.text
    # A prompt longer than max_len leaves no assistant token: nothing usable -> a clear error.
    path = write_jsonl(tmp_path / "prompt.jsonl", [{"instruction": "word " * 200, "output": "x"}])
    with pytest.raises(DataError, match="no usable examples"):
        load_sft([path], tok, max_len=32)


def test_pretraining_packing_puts_eos_between_documents(tmp_path, toks):
    tok = Tokenizer.from_dir(toks["chatml"])
    docs = ["Hello world!", "The quick brown fox.", "你好世界", "12 * 34 = 408."]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    exs, _ = load_text([path], tok, max_len=8, packing=True)
    eos = tok.eos_token_ids[0]
    stream = [i for e in exs for i in e.ids]
    want = [i for d in docs for i in tok.encode(d) + [eos]]
    assert stream == want
    assert all(len(e.ids) == 8 for e in exs[:-1]) and all(all(e.targets) for e in exs)
    unpacked, _ = load_text([path], tok, max_len=64, packing=False)
    assert [e.ids for e in unpacked] == [tok.encode(d) + [eos] for d in docs]


def test_sampler_is_deterministic_resumable_and_sharded():
    a = ResumableSampler(10, seed=3)
    seq = [a.next(4) for _ in range(6)]  # crosses epoch boundaries
    flat = [i for b in seq for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    b = ResumableSampler(10, seed=3)
    for _ in range(3):
        b.next(4)
    state = b.state_dict()
    c = ResumableSampler(10, seed=3)
    c.load_state_dict(state)
    assert [c.next(4) for _ in range(3)] == seq[3:]
    # Two ranks with batch 2 cover exactly what one rank with batch 4 covers.
    r0, r1 = ResumableSampler(10, 3, rank=0, world=2), ResumableSampler(10, 3, rank=1, world=2)
    for b4 in seq:
        assert r0.next(2) + r1.next(2) == b4
