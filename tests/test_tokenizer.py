"""lmstack.tokenizer against transformers' tokenizer on tiny folders (tests/tok_fixtures.py)."""
from __future__ import annotations

import json
import random

import pytest

from lmstack.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer, TokenizerError
from tests.tok_fixtures import build_test_tokenizer

transformers = pytest.importorskip("transformers")

STYLES = ["chatml", "llama3", "mistral"]
TEXTS = [
    "Hello world! How are you today?",
    "你好世界，今天天气很好。",
    "Emoji 😀🎉👍🚀 and a family 👨‍👩‍👧 ❤️",
    "Mixed: 7 个苹果加 5 个苹果是多少？答案 12. Ünïcödé ñ 日本語",
    "  leading and trailing spaces \n\t tabs\n",
    "",
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 3?"}],
    "system": [{"role": "system", "content": "You are a terse math tutor."},
               {"role": "user", "content": "你好！7 个苹果加 5 个苹果是多少？"}],
    "multi": [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi 😀"},
              {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "  Add 17 and 25.  "},
              {"role": "assistant", "content": "17 + 25 = 42"},
              {"role": "user", "content": "Thanks"}],
}


@pytest.fixture(scope="module", params=STYLES)
def pair(request, tmp_path_factory):
    d = build_test_tokenizer(tmp_path_factory.mktemp(request.param), style=request.param)
    return request.param, Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


def test_encode_decode_match_transformers(pair):
    style, tok, hf = pair
    assert len(tok) == len(hf)
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == hf(text, add_special_tokens=special)["input_ids"], (style, text, special)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    assert tok.encode_batch(TEXTS) == [hf(t)["input_ids"] for t in TEXTS]
    assert tok.bos_token_id == hf.bos_token_id and tok.pad_token_id == hf.pad_token_id
    assert tok.eos_token_id == hf.eos_token_id
    for t in ["<|im_end|>", "<|eot_id|>", "[INST]", "Hello", "nope-not-a-token"]:
        assert tok.token_to_id(t) == hf.convert_tokens_to_ids(t) or tok.token_to_id(t) is None
    assert tok.id_to_token(5) == hf.convert_ids_to_tokens(5)


def test_bos_handling_per_family(pair):
    style, tok, _ = pair
    ids = tok.encode("hi")
    if style == "chatml":
        assert tok.bos_token_id is None and tok.special_ids.isdisjoint(ids)
    elif style == "llama3":  # from tokenizer.json's post-processor
        assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids.count(ids[0]) == 1
    else:  # from add_bos_token in tokenizer_config.json
        assert ids[0] == tok.token_to_id("<s>") and tok.encode("hi", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_byte_identical(pair, conv, gen):
    style, tok, hf = pair
    messages = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    ref = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours == ref
    ours_ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    ref_ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours_ids == list(ref_ids)
    # The rendering really is family-specific (guards against a template that was not loaded).
    marker = {"chatml": "<|im_start|>user\n", "llama3": "<|start_header_id|>user<|end_header_id|>\n\n",
              "mistral": " [INST] "}[style]
    assert marker in ours


def test_qwen_default_system_and_tools(tmp_path):
    d = build_test_tokenizer(tmp_path, "chatml")
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    msgs = CONVERSATIONS["single"]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    tools = [{"type": "function", "function": {"name": "add", "description": "Add <a> & 'b' — 加法",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    calls = msgs + [{"role": "assistant", "content": None,
                     "tool_calls": [{"type": "function", "function": {"name": "add",
                                                                      "arguments": {"a": 2, "b": "三"}}}]},
                    {"role": "tool", "content": "5"}, {"role": "tool", "content": "ok"}]
    ours = tok.apply_chat_template(calls, tools=tools, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(calls, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '"description": "Add <a> & \'b\' — 加法"' in ours  # tojson: no HTML escaping, no \u escapes


def test_template_environment_features(tmp_path):
    """Loop controls, namespace, strftime_now, tojson options and extra kwargs render like transformers."""
    d = build_test_tokenizer(tmp_path, "llama3")
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{{ bos_token }}[{{ strftime_now('%Y') }}|{{ date_string | default('none') }}]"
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m.role }}={{ m | tojson(indent=2, sort_keys=True) }}"
        "{% if ns.n >= 2 %}{% break %}{% endif %}{% endfor %}"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
        "{{ {'x': [1, 2], 'y': 'é<'} | tojson(separators=(',', ':')) }}"
        "{% if add_generation_prompt %}GO{% endif %}"
    )
    messages = CONVERSATIONS["multi"]
    for kw in ({}, {"date_string": "26 Jul 2024"}):
        ours = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, **kw)
        ref = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                     tokenize=False, **kw)
        assert ours == ref
        assert "\n  \"content\"" in ours  # indent=2 really reached json.dumps


def test_template_errors_are_named(tmp_path):
    d = build_test_tokenizer(tmp_path, "mistral")
    tok = Tokenizer.from_dir(d)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template(bad, chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([])


def test_missing_tokenizer_json_names_path(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_eos_ids_union_with_generation_config(tmp_path):
    d = build_test_tokenizer(tmp_path / "l", "llama3")
    tok = Tokenizer.from_dir(d)
    eot, eot_text = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.eos_token_ids == [eot, eot_text]  # config eos first, then generation_config's others
    gen = tmp_path / "l" / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": eot_text}))  # an int, not a list
    assert Tokenizer.from_dir(d).eos_token_ids == [eot, eot_text]
    gen.unlink()
    assert Tokenizer.from_dir(d).eos_token_ids == [eot]


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over the config entry; a list of named templates uses 'default'."""
    d = tmp_path / "t"
    build_test_tokenizer(d, "chatml")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                            {"name": "tool_use", "template": "T{{ tools | length }}"}]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    msgs = CONVERSATIONS["single"]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False) == "DWhat is 2 + 3?"
    assert tok.apply_chat_template(msgs, tools=[{"name": "f"}]) == "T1"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "J1"
    # save() writes a folder both loaders read back identically
    out = tmp_path / "saved"
    Tokenizer.from_dir(d).save(out)
    tok2, hf2 = Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(out)
    assert tok2.apply_chat_template(msgs) == hf2.apply_chat_template(msgs, tokenize=False) == "J1"
    assert tok2.encode(TEXTS[2]) == hf2(TEXTS[2])["input_ids"] == tok.encode(TEXTS[2])


STREAM_TEXT = "你好世界！Streaming 中文 and emoji 😀🎉👨‍👩‍👧 ❤️ 7 个苹果加 5 个苹果是多少？答案：12。🚀"


@pytest.mark.parametrize("style", STYLES)
def test_incremental_detokenizer_streams_utf8(tmp_path, style):
    tok = Tokenizer.from_dir(build_test_tokenizer(tmp_path, style))
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    # the tiny vocab must really split characters across tokens, or the test proves nothing
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids]
    deltas.append(det.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == det.text == tok.decode(ids) == STREAM_TEXT
    assert sum(1 for d in deltas if d == "") > 0  # something was held back


def test_incremental_detokenizer_specials_and_random(tmp_path):
    tok = Tokenizer.from_dir(build_test_tokenizer(tmp_path, "chatml"))
    ids = tok.apply_chat_template(CONVERSATIONS["multi"], tokenize=True) + tok.encode(STREAM_TEXT)
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        out = "".join(det.add(i) for i in ids) + det.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)
    # Random id streams (including invalid UTF-8 byte sequences): deltas still add up to decode().
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        det = IncrementalDetokenizer(tok)
        out = "".join(det.add(i) for i in ids) + det.flush()
        assert out == tok.decode(ids)


def test_incremental_detokenizer_metaspace_spaces(tmp_path):
    """SentencePiece-style decoders drop the first token's leading '▁'; the window keeps inner spaces."""
    from lmstack.tokenizer_train import train_tokenizer_from_iterator
    from tests.tok_fixtures import CORPUS

    d = train_tokenizer_from_iterator(CORPUS * 3, "unigram", 600, tmp_path / "u").out_dir
    tok = Tokenizer.from_dir(d)
    text = "Hello world, how are you? 你好 😀 wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids] + [det.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in x for x in deltas)
    # with the prompt as context, a continuation keeps its leading space
    prompt, cont = tok.encode("Hello"), tok.encode(" world", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(det.add(i) for i in cont) + det.flush() == tok.decode(prompt + cont)[len("Hello"):]
