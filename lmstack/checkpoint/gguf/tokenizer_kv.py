"""The tokenizer.ggml.* values of an export: from an HF tokenizer folder (byte-level BPE, llama.cpp's
'gpt2', or SentencePiece-style BPE, its 'llama'), or copied from a GGUF file being re-exported."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.checkpoint.gguf.fields import field
from lmstack.checkpoint.gguf.pretok import json_brief, llama_cpp_name
from lmstack.log import logger

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class TokenizerKV:
    tokens: list[str]
    types: list[int]
    model: str  # "gpt2" | "llama"
    merges: list[str] | None = None  # gpt2
    pre: str | None = None  # gpt2
    scores: list[float] | None = None  # llama
    space_prefix: bool = True  # llama
    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    pad: int | None = None
    unk: int | None = None
    add_bos: bool = False
    template: str | None = None

    def write(self, w) -> None:
        """Into a GGUFWriter, in the order the exporter always uses (re-exports are byte-identical)."""
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.model == "gpt2":
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(self.pre)
            w.add_token_merges(self.merges)
        else:  # SentencePiece BPE: scores rank the pairs, no merge list
            w.add_tokenizer_model("llama")
            w.add_token_scores(self.scores)
            w.add_add_space_prefix(self.space_prefix)
            if self.unk is not None:
                w.add_unk_token_id(self.unk)
        for add, v in ((w.add_bos_token_id, self.bos), (w.add_eos_token_id, self.eos), (w.add_pad_token_id, self.pad),
                       (w.add_eot_token_id, self.eot)):
            if v is not None:
                add(int(v))
        w.add_add_bos_token(bool(self.add_bos))
        if self.template:
            w.add_chat_template(self.template)


def _sentencepiece_style(tj: dict) -> str | None:
    """'prefix' / 'plain' for a SentencePiece-style BPE tokenizer.json (Llama 2, Mistral, TinyLlama:
    byte fallback, spaces as U+2581, with or without a prepended one), None for byte-level BPE."""
    if not tj.get("model", {}).get("byte_fallback"):
        return None
    pre = tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    meta = next((p for p in pres if p.get("type") == "Metaspace"), None)
    if meta is not None:
        return "plain" if meta.get("prepend_scheme", "always") == "never" or meta.get("add_prefix_space") is False \
            else "prefix"
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(x.get("type") == "Replace" and x.get("content") == "\u2581" for x in norms):
        return "prefix" if any(x.get("type") == "Prepend" and x.get("prepend") == "\u2581" for x in norms) else "plain"
    return None


def _check_byte_level(tj: dict, source: str) -> None:
    """What llama.cpp's 'gpt2' tokenizer cannot do: refuse, or warn where llama.cpp's own converter writes it."""
    norm = tj.get("normalizer")
    norms = (norm or {}).get("normalizers", [norm]) if (norm or {}).get("type") == "Sequence" else [norm]
    for n in (x for x in norms if x):
        if n.get("type") == "NFC":  # Qwen2 ships it; llama.cpp's converter writes such files as they are
            logger.warning("%s: llama.cpp does not NFC-normalize; text not already in NFC tokenizes differently",
                           source)
        else:
            raise GGUFError(f"{source}: normalizer ({json_brief(n)}) has no llama.cpp equivalent for a byte-level "
                            "BPE vocabulary")
    model = tj.get("model", {})
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise GGUFError(f"{source}: BPE option {key}={model[key]!r} has no llama.cpp equivalent")


def _merges_reach_every_token(vocab: dict[str, int], merges: list[str], added: set[int]) -> bool:
    """Whether merging alone turns every (non-added) vocabulary token into itself: then llama.cpp's
    ignore_merges flag cannot change any id."""
    from tokenizers import models

    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
    return all([t.value for t in bpe.tokenize(tok)] == [tok] for tok, i in vocab.items() if i not in added)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def tokenizer_kv_from_folder(model_dir: Path, vocab_size: int) -> TokenizerKV:
    gguf = gguf_module()
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise GGUFError(f"{model_dir}: tokenizer.json is missing; GGUF export embeds the tokenizer")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{tj_path}: tokenizer model {model.get('type')!r} is not supported for GGUF export "
                        "(only BPE: byte-level, llama.cpp's 'gpt2', or SentencePiece-style, its 'llama')")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    bpe_vocab = dict(vocab)
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise GGUFError(f"{tj_path}: tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}")
    spm = _sentencepiece_style(tj)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.BYTE if spm and _BYTE_TOKEN.fullmatch(tok) else gguf.TokenType.NORMAL)
    if spm and model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = int(gguf.TokenType.UNKNOWN)
    for i, t in added.items():
        if types[i] != int(gguf.TokenType.UNKNOWN):
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFError(f"{tj_path}: the BPE tokenizer has no merges; llama.cpp refuses a 'gpt2' vocabulary "
                        "without tokenizer.ggml.merges")
    cfg = _read_json(model_dir / "tokenizer_config.json")

    def tid(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    from tokenizers import Tokenizer

    bos = tid("bos_token")
    probe = Tokenizer.from_file(str(tj_path)).encode("a", add_special_tokens=True).ids
    # chat models end a turn with a second id (generation_config.json): llama.cpp's end-of-turn token
    g = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    gen_eos = [int(i) for i in ([g] if isinstance(g, int) else list(g or []))]
    eos = tid("eos_token")
    template = cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    kv = TokenizerKV(tokens=tokens, types=types, model="llama" if spm else "gpt2", bos=bos, eos=eos,
                     eot=next((i for i in gen_eos if i != eos), None), pad=tid("pad_token"),
                     add_bos=bool(bos is not None and probe and probe[0] == bos), template=template)
    if spm:
        # llama.cpp's SentencePiece tokenizer joins the adjacent pair whose concatenation scores highest:
        # a token's score is minus the rank of the first merge that makes it (characters, which no merge
        # makes, and unreachable pieces come after every merge)
        made: dict[str, int] = {}
        for r, m in enumerate(merges):
            made.setdefault(m.replace(" ", ""), r)
        kv.scores = [-float(made.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
        kv.space_prefix = spm == "prefix"
        kv.unk = vocab.get(model.get("unk_token"))
    else:
        _check_byte_level(tj, str(tj_path))
        kv.merges = merges
        kv.pre = llama_cpp_name(tj, str(tj_path), bool(cfg.get("clean_up_tokenization_spaces", False)),
                                lambda: _merges_reach_every_token(bpe_vocab, merges, set(added)))
    return kv


def tokenizer_kv_from_gguf(reader, path: Path) -> TokenizerKV:
    """The tokenizer of a GGUF file as it is, for re-exporting that file's model."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{path}: GGUF tokenizer model {kind!r} cannot be re-exported (only 'gpt2' and 'llama')")

    def opt_int(key: str) -> int | None:
        v: Any = field(reader, key)
        return None if v is None else int(v)

    return TokenizerKV(
        tokens=list(field(reader, "tokenizer.ggml.tokens")), types=[int(t) for t in field(reader, "tokenizer.ggml.token_type")],
        model=kind, merges=field(reader, "tokenizer.ggml.merges"), pre=field(reader, "tokenizer.ggml.pre", "default"),
        scores=field(reader, "tokenizer.ggml.scores"), space_prefix=bool(field(reader, "tokenizer.ggml.add_space_prefix", True)),
        bos=opt_int("tokenizer.ggml.bos_token_id"), eos=opt_int("tokenizer.ggml.eos_token_id"),
        eot=opt_int("tokenizer.ggml.eot_token_id"), pad=opt_int("tokenizer.ggml.padding_token_id"),
        unk=opt_int("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        template=field(reader, "tokenizer.chat_template"))
