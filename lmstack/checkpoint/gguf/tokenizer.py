"""tokenizer.ggml.* -> an HF tokenizer folder (tokenizer.json, tokenizer_config.json,
generation_config.json) that tokenizes as llama.cpp does with the same file.

Two vocabulary kinds: llama.cpp's 'gpt2' (byte-level BPE with explicit merges, split first by the
pre-tokenizer that `tokenizer.ggml.pre` names; see pretok.py) and 'llama' (SentencePiece BPE, ranked
by token scores: Llama 1/2, Mistral, TinyLlama, Gemma).
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.checkpoint.gguf.fields import field
from lmstack.checkpoint.gguf.pretok import hf_pre_tokenizer, spec_for
from lmstack.log import logger


def _byte_level_bpe(reader, path: Path, tokens: list[str]):
    """llama.cpp's 'gpt2' tokenizer: byte-level BPE with explicit merges and a split regex list."""
    from tokenizers import Tokenizer, decoders, models

    merges = field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{path}: a 'gpt2' tokenizer needs tokenizer.ggml.merges (llama.cpp refuses it too)")
    pre = field(reader, "tokenizer.ggml.pre")
    if pre is None:
        logger.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' split as llama.cpp does", path)
    spec = spec_for(pre, str(path))
    # HF keeps added tokens in the model vocab too, so each keeps its GGUF id
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")  # llama.cpp splits at the first space (a token never starts with one)
        if not sep:
            raise GGUFError(f"{path}: merge {m!r} in tokenizer.ggml.merges has no space")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = hf_pre_tokenizer(spec)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader, path: Path, tokens: list[str], types: list[int]):
    """llama.cpp's 'llama' tokenizer (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama ...) as a
    `tokenizers` BPE that segments text the same way.

    llama.cpp starts from the UTF-8 characters of the text (spaces written as U+2581, one prepended
    when add_space_prefix) and repeatedly joins the adjacent pair whose concatenation is a vocabulary
    token with the highest score (leftmost on ties); characters it never joins into a token become
    <0xNN> byte tokens. A BPE whose merge list holds every split (a, b) of every normal token, ranked
    by that token's score, takes the same steps; byte_fallback gives the byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    gguf = gguf_module()
    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{path}: a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores for each of its "
                        f"{len(tokens)} tokens; found {None if scores is None else len(scores)}")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.USER_DEFINED))
    ranked = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if int(ty) in mergeable:
            ranked += [(-float(scores[i]), i, t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    ranked.sort()
    unk_id = next((i for i, ty in enumerate(types) if int(ty) == int(gguf.TokenType.UNKNOWN)), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], byte_fallback=True,
                               unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def write_tokenizer(reader, path: Path, out_dir: Path) -> None:
    """tokenizer.ggml.* -> tokenizer.json + tokenizer_config.json (+ generation_config.json) in out_dir."""
    from tokenizers import AddedToken, processors

    gguf = gguf_module()
    kind = field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                        "'llama' SentencePiece BPE); load the weights with load_gguf(..., with_tokenizer=False) "
                        "and pass a tokenizer folder")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens is missing or empty")
    types = field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if len(set(tokens)) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if t in tokens[:i])
        raise GGUFError(f"{path}: token {dup!r} appears twice in tokenizer.ggml.tokens (llama.cpp refuses this too)")
    tok = _byte_level_bpe(reader, path, tokens) if kind == "gpt2" else _sentencepiece_bpe(reader, path, tokens, types)
    # UNUSED: vocabulary padding rows ([PAD300] ...) -- special, so decoding skips them like the HF folder does
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED),
               int(gguf.TokenType.UNKNOWN)}
    added = [(i, AddedToken(t, special=int(types[i]) != int(gguf.TokenType.USER_DEFINED), normalized=False))
             for i, t in enumerate(tokens) if int(types[i]) in special]
    tok.add_special_tokens([a for _, a in added if a.special])
    tok.add_tokens([a for _, a in added if not a.special])
    for i, a in added:
        if tok.token_to_id(a.content) != i:
            raise GGUFError(f"{path}: token {a.content!r} should have id {i} but got {tok.token_to_id(a.content)} "
                            "when rebuilding the tokenizer")

    def name(key: str) -> str | None:
        i = field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = (name(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level ones do not
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
           "add_bos_token": add_bos, "clean_up_tokenization_spaces": False}
    template = field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    eos_ids = [int(i) for i in (field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.ggml.eot_token_id"))
               if i is not None]
    if eos_ids:
        gen = {"eos_token_id": list(dict.fromkeys(eos_ids))}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
