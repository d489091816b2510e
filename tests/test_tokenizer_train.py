"""lmstack.tokenizer_train: each algorithm trains, writes a folder transformers loads identically,
byte-level BPE is lossless on arbitrary UTF-8, split_digits works, and the CLI verb runs."""
from __future__ import annotations

import argparse
import json
import random

import pytest

from lmstack.tokenizer import IncrementalDetokenizer, Tokenizer
from lmstack.tokenizer_train import (
    add_parser,
    compression,
    run,
    train_tokenizer,
    train_tokenizer_from_iterator,
)
from tests.tok_fixtures import CORPUS

transformers = pytest.importorskip("transformers")

HELDOUT = ["The lazy dog sleeps; the quick fox runs. 42 + 17 = 59.", "今天我们学习语言模型。", "Party 🎉 at 9 😀"]
ALGOS = ["bpe", "wordpiece", "unigram"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "train.txt"
    p.write_text("\n".join(CORPUS * 5) + "\n", encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module", params=ALGOS)
def trained(request, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    res = train_tokenizer([corpus_file], request.param, 600, out)
    return request.param, res, Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(out)


def test_folder_loads_in_transformers_and_matches(trained):
    algo, res, tok, hf = trained
    assert res.vocab_size == len(tok) == len(hf)
    assert 100 < res.vocab_size <= 600
    for text in HELDOUT + CORPUS[:4]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], (algo, text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # special tokens are single ids and named as configured
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(t, add_special_tokens=False) == [tok.token_to_id(t)]
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")] and hf.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>") == hf.pad_token_id
    # the default ChatML template renders the same in both
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "你好 😀"}]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n你好 😀<|im_end|>\n<|im_start|>assistant\n"
    with open(f"{res.out_dir}/tokenizer_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 2048


def test_algorithm_specific_behaviour(trained):
    algo, res, tok, _ = trained
    vocab = tok.get_vocab()
    text = "Hello wörld 你好 😀 ⅀"  # ⅀ never appears in training
    ids = tok.encode(text)
    if algo == "bpe":
        assert tok.decode(ids) == text and tok.unk_token_id is None
    elif algo == "wordpiece":
        assert any(t.startswith("##") for t in vocab)
        assert tok.token_to_id("<unk>") in ids  # unseen character
        assert tok.decode(ids).replace(" ", "").startswith("Hellow")  # BERT-style: words joined by spaces
    else:
        assert res.byte_fallback and tok.token_to_id("<0xE2>") is not None
        assert any(t.startswith("▁") for t in vocab)
        assert tok.decode(ids) == text  # unseen ⅀ survives through byte fallback


def test_streaming_matches_decode(trained):
    algo, _, tok, _ = trained
    for text in HELDOUT + ["Hello, world! Isn't it nice? 7 个苹果。"]:
        ids = tok.encode(text)
        det = IncrementalDetokenizer(tok)
        deltas = [det.add(i) for i in ids] + [det.flush()]
        assert "".join(deltas) == tok.decode(ids), algo
        assert all("\ufffd" not in d for d in deltas)


def _random_unicode(rng: random.Random) -> str:
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xAC00, 0xD7A3),
             (0x0600, 0x06FF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(rng.randrange(1, 60)):
        lo, hi = rng.choice(pools)
        c = rng.randrange(lo, hi + 1)
        if 0xD800 <= c <= 0xDFFF:  # surrogates are not encodable UTF-8
            continue
        out.append(chr(c))
    return "".join(out) + rng.choice(["", " ", "\n", "\r\n", "\t", "  x"])


def test_bpe_round_trips_arbitrary_utf8(tmp_path):
    res = train_tokenizer_from_iterator(iter(CORPUS * 3), "bpe", 400, tmp_path / "bpe")
    tok, hf = Tokenizer.from_dir(res.out_dir), transformers.AutoTokenizer.from_pretrained(res.out_dir)
    rng = random.Random(1234)
    for _ in range(200):
        s = _random_unicode(rng)
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
        assert max(ids) < len(tok)
    for s in [_random_unicode(rng) for _ in range(20)]:
        assert tok.encode(s) == hf(s)["input_ids"]
    # streaming on random text, too
    s = "".join(_random_unicode(rng) for _ in range(10))
    det = IncrementalDetokenizer(tok)
    assert "".join(det.add(i) for i in tok.encode(s)) + det.flush() == s


@pytest.mark.parametrize("algo", ALGOS)
def test_split_digits(tmp_path, algo):
    corpus = CORPUS * 3 + ["1234567890 " * 20, "2024 2025 100 999 12345"] * 10
    plain = Tokenizer.from_dir(train_tokenizer_from_iterator(corpus, algo, 600, tmp_path / "p").out_dir)
    split = Tokenizer.from_dir(
        train_tokenizer_from_iterator(corpus, algo, 600, tmp_path / "s", split_digits=True).out_dir)
    text = "In 2024 we sold 1234567 apples"
    toks = [split.id_to_token(i) for i in split.encode(text)]
    digit_toks = [t for t in toks if any(c.isdigit() for c in t)]
    assert "".join(digit_toks).replace("▁", "").replace("Ġ", "") == "20241234567"
    assert all(sum(c.isdigit() for c in t) == 1 for t in digit_toks)
    # without splitting, the frequent number strings do merge (so the test would catch a no-op)
    plain_toks = [plain.id_to_token(i) for i in plain.encode(text)]
    assert any(sum(c.isdigit() for c in t) > 1 for t in plain_toks)


def test_compression_is_sane(trained):
    algo, res, tok, _ = trained
    c = compression(tok, HELDOUT)
    assert c == compression(res.out_dir, HELDOUT)
    n_bytes = sum(len(t.encode()) for t in HELDOUT)
    n_tok = sum(len(tok.encode(t, add_special_tokens=False)) for t in HELDOUT)
    assert c == pytest.approx(n_bytes / n_tok)
    assert 1.0 < c < 8.0
    with pytest.raises(ValueError):
        compression(tok, [""])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="algo"):
        train_tokenizer_from_iterator(CORPUS, "sentencepiece", 500, tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer_from_iterator(CORPUS, "bpe", 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([str(tmp_path / "missing.txt")], "bpe", 500, tmp_path)


def test_add_bos_flag_without_post_processor(tmp_path):
    """A folder whose tokenizer.json has no post-processor: tokenizer_config's add_bos_token decides."""
    out = train_tokenizer_from_iterator(CORPUS, "wordpiece", 300, tmp_path / "w").out_dir
    cfg_path = tmp_path / "w" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert Tokenizer.from_dir(out).encode("hello")[0] != Tokenizer.from_dir(out).bos_token_id
    cfg["add_bos_token"] = True
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(out)
    assert tok.encode("hello")[0] == tok.bos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.encode("hello", add_special_tokens=False) == tok.encode("hello")[1:]


def test_cli(tmp_path, corpus_file, capsys):
    parser = argparse.ArgumentParser(prog="lmstack")
    add_parser(parser.add_subparsers(dest="cmd"))
    held = tmp_path / "held.txt"
    held.write_text("\n".join(HELDOUT), encoding="utf-8")
    args = parser.parse_args(["tokenizer", "train", "--algo", "bpe", "--vocab-size", "400", "--out",
                              str(tmp_path / "cli"), "--split-digits", "--heldout", str(held), corpus_file])
    assert args.func is run
    assert run(args) == 0
    out = capsys.readouterr().out
    tok = Tokenizer.from_dir(tmp_path / "cli")
    assert f"vocab size {len(tok)}" in out
    lines = held.read_text(encoding="utf-8").splitlines(keepends=True)  # the file as written, newlines too
    assert f"{compression(tok, lines):.3f} bytes/token" in out
    bad = parser.parse_args(["tokenizer", "train", "--vocab-size", "10", "--out", str(tmp_path / "x"), corpus_file])
    assert run(bad) == 2
    assert "vocab_size=10" in capsys.readouterr().err
    missing = parser.parse_args(["tokenizer", "train", "--vocab-size", "400", "--out", str(tmp_path / "y"),
                                 "--heldout", str(tmp_path / "nope.txt"), corpus_file])
    assert run(missing) == 2 and not (tmp_path / "y").exists()
    assert "nope.txt" in capsys.readouterr().err
