"""GGUF tokenizers against llama.cpp (llama-cpp-python): every pre-tokenizer name lmstack reads splits
text as llama.cpp does, and `export gguf` writes the name under which llama.cpp tokenizes like
transformers does on the source folder (or refuses, naming the pre-tokenizer)."""
from __future__ import annotations

import json

import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from lmstack.checkpoint.gguf.errors import GGUFError  # noqa: E402
from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.checkpoint.gguf.load import load_gguf  # noqa: E402
from lmstack.checkpoint.gguf.pretok import HF_CONTRACTIONS, LLAMA3, PRE_TOKENIZERS, QWEN2, _CONTRACTIONS  # noqa: E402
from lmstack.checkpoint.gguf.reader import open_gguf  # noqa: E402
from lmstack.checkpoint.gguf.tokenizer import write_tokenizer  # noqa: E402
from tests.tok_fixtures import CORPUS  # noqa: E402

# varied text: digits (runs, groups, decimals, non-ASCII digits), spaces (leading, trailing, runs, tabs,
# no-break, ideographic), newlines (CRLF, blank lines), CJK, kana, hangul, emoji (ZWJ, flags), code,
# contractions in both cases, punctuation and symbols, mixed-case non-ASCII words
TEXTS = CORPUS + [
    "  leading spaces and trailing   ", "tabs\tand\r\nCRLF\n\n\nnewlines", "123456789 + 0.5 = x; 1,000,000 and 2024-01-31",
    "I'm can't we'll THEY'RE it's O'Neil", "ÉcoleÉté naïveCafé ÀB straße", "日本語のテキスト、カタカナ。한국어 텍스트입니다",
    "x~y $5 a+b<c>d^e`f|g @user #tag 50% 3*4", "def f(x):\n\treturn x**2  # comment\n\nclass A: pass\n",
    "😀🎉👍 family 👨‍👩‍👧 flags 🇫🇷🇯🇵", "Ωmega ñ ß ١٢٣ ٤ ½ Ⅻ", "hello world Hello World HELLO WORLD",
    "wow!!! ... ?? ¿qué? «quotes» — dash – en", "a\u3000b\u00a0c", "x  \n  y", "12345678901234567890", "",
]


def _byte_level_vocab(pre, size: int = 700, extra_words=("Hello", " world", " quick", "12", "345", " brown")):
    """A byte-level BPE trained here; plus whole-word tokens that merging does not reach, so a
    pre-tokenizer's ignore_merges flag changes ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for w in extra_words:
        t = bl.pre_tokenize_str(w)[0][0]
        vocab.setdefault(t, len(vocab))
    return tj


def _vocab_only_gguf(path, tj: dict, pre: str):
    """A GGUF file holding only a 'gpt2' vocabulary (llama.cpp loads it with vocab_only=True)."""
    vocab = tj["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([int(gguf.TokenType.NORMAL)] * len(vocab))
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_cpp_ids(f, texts):
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    return [ref.tokenize(t.encode(), add_bos=False, special=False) for t in texts]


def test_every_pre_tokenizer_name_splits_as_llama_cpp(tmp_path):
    """For each of the 70+ names lmstack knows, a GGUF vocabulary with that tokenizer.ggml.pre: the
    tokenizer lmstack rebuilds gives llama.cpp's ids on every text."""
    from lmstack.tokenizer import Tokenizer as LmTokenizer

    tj = _byte_level_vocab(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    agree = {}
    for name in sorted(PRE_TOKENIZERS):
        f = _vocab_only_gguf(tmp_path / f"{name}.gguf", tj, name)
        write_tokenizer(open_gguf(f), f, tmp_path / name)
        ours = LmTokenizer.from_dir(tmp_path / name)
        ref = _llama_cpp_ids(f, TEXTS)
        agree[name] = sum(ours.encode(t, add_special_tokens=False) == ids for t, ids in zip(TEXTS, ref))
    assert agree == dict.fromkeys(agree, len(TEXTS))
    # the names really differ: digits one by one (smollm), in threes (llama-bpe), as one run (gpt-2)
    f = {n: tmp_path / f"{n}.gguf" for n in ("gpt-2", "smollm", "llama-bpe", "smaug-bpe")}
    probe = ["12345678901234567890", "Hello world"]
    ids = {n: _llama_cpp_ids(p, probe) for n, p in f.items()}
    assert len({str(ids[n][0]) for n in ("gpt-2", "smollm", "llama-bpe")}) == 3  # three digit rules
    assert ids["llama-bpe"][1] != ids["smaug-bpe"][1]  # same split, ignore_merges differs: "Hello" is one token


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    tj = _byte_level_vocab(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), 300)
    f = _vocab_only_gguf(tmp_path / "x.gguf", tj, "kimi-k2")
    with pytest.raises(GGUFError, match=r"x.gguf: pre-tokenizer 'kimi-k2' \(tokenizer.ggml.pre\) is not supported"):
        write_tokenizer(open_gguf(f), f, tmp_path / "x")


# ---------------------------------------------------------------------------------------------- export
def _folder(tmp_path, name: str, pre, normalizer=None, ignore_merges: bool = False, clean: bool = False):
    """An HF model folder (tiny llama) whose tokenizer.json has this pre-tokenizer."""
    from tokenizers import decoders, processors

    from tests.fixtures import make_tiny_hf

    d = tmp_path / name
    tj = _byte_level_vocab(pre, 500)
    tj["model"]["ignore_merges"] = ignore_merges
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.add_special_tokens(["<|endoftext|>"])
    make_tiny_hf("llama", d, vocab_size=tok.get_vocab_size() + 4, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
           "clean_up_tokenization_spaces": clean}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _split(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


KINDS = {
    # GPT-2's byte-level split
    "gpt-2": dict(pre=pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    # SmolLM: digits one by one, then GPT-2's split
    "smollm": dict(pre=pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])),
    # Llama 3: its regex (HF spelling) and ignore_merges, as Meta's tokenizer.json has them
    "llama-bpe": dict(pre=_split(LLAMA3.replace(_CONTRACTIONS, HF_CONTRACTIONS)), ignore_merges=True),
    # Qwen2: its regex and NFC (llama.cpp does not normalize: the texts here are NFC already)
    "qwen2": dict(pre=_split(QWEN2.replace(_CONTRACTIONS, HF_CONTRACTIONS)), normalizer=normalizers.NFC()),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_export_writes_the_name_llama_cpp_tokenizes_like_transformers(kind, tmp_path):
    """`export gguf` of a folder with each pre-tokenizer lmstack can export: llama.cpp's ids on the
    exported file equal transformers' on the folder for every text, and lmstack reads the file back to
    the same ids."""
    import transformers

    from lmstack.tokenizer import Tokenizer as LmTokenizer

    d = _folder(tmp_path, kind, **KINDS[kind])
    f = export_gguf(d, tmp_path / f"{kind}.gguf", "f32")
    assert open_gguf(f).get_field("tokenizer.ggml.pre").contents() == kind
    hf = transformers.AutoTokenizer.from_pretrained(d)
    want = [hf(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    got = _llama_cpp_ids(f, TEXTS)
    assert sum(a == b for a, b in zip(got, want)) == len(TEXTS)
    _, _, tok_dir = load_gguf(f)
    back = LmTokenizer.from_dir(tok_dir)
    assert [back.encode(t, add_special_tokens=False) for t in TEXTS] == got


def test_clean_up_spaces_picks_among_equal_splits(tmp_path):
    """Digits + ByteLevel is both llama.cpp's 'smollm' (no clean-up of detokenized spaces) and its
    'starcoder' (clean-up): the folder's clean_up_tokenization_spaces decides."""
    d = _folder(tmp_path, "sc", KINDS["smollm"]["pre"], clean=True)
    f = export_gguf(d, tmp_path / "sc.gguf", "f32")
    assert open_gguf(f).get_field("tokenizer.ggml.pre").contents() == "starcoder"


@pytest.mark.parametrize("case", ["prefix_space", "whitespace", "custom_regex", "lowercase", "ignore_merges"])
def test_export_refuses_what_llama_cpp_would_tokenize_differently(case, tmp_path):
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    spec = {
        "prefix_space": (dict(pre=pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)), "add_prefix_space"),
        "whitespace": (dict(pre=pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), bl])), "WhitespaceSplit"),
        "custom_regex": (dict(pre=_split(r"\w+|\W")), r"no pre-tokenizer that splits with \['\\\\w\+\|\\\\W'\]"),
        "lowercase": (dict(pre=bl, normalizer=normalizers.Lowercase()), "normalizer .*Lowercase"),
        # Qwen2's split with ignore_merges: llama.cpp's qwen2 merges, and this vocabulary has unreachable words
        "ignore_merges": (dict(pre=_split(QWEN2), ignore_merges=True), "ignore_merges=True changes its ids"),
    }[case]
    d = _folder(tmp_path, case, **spec[0])
    with pytest.raises(GGUFError, match=spec[1]):
        export_gguf(d, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()
