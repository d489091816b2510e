"""Train a tokenizer with the `tokenizers` library and write a complete HF tokenizer folder.

Three algorithms, each set up the way the model family it is named after does it:
- "bpe": byte-level BPE (GPT-2 / Llama-3 / Qwen): text is mapped to bytes before merging, so every
  UTF-8 string round-trips exactly and there is no unknown token.
- "wordpiece": BERT: BertNormalizer, split on whitespace and punctuation, "##" marks a word's
  continuing pieces, unknown words become <unk>.
- "unigram": SentencePiece: spaces become "▁" (Metaspace) and the Unigram LM picks the most likely
  segmentation; characters never seen in training fall back to <0xXX> byte tokens (as SentencePiece's
  byte_fallback) when the vocabulary has room for the 256 byte tokens, else to <unk>.

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads in lmstack's
Tokenizer and in transformers.AutoTokenizer. Special tokens follow Qwen's ChatML convention:
<|endoftext|> separates documents (bos and pad), <|im_start|>/<|im_end|> delimit chat turns and
<|im_end|> is the eos a chat model stops on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmstack.log import logger
from lmstack.tokenizer import Tokenizer, TokenizerError

ALGORITHMS = ("bpe", "wordpiece", "unigram")
ENDOFTEXT, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# The standard ChatML template (no default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Byte fallback needs 256 ids for <0x00>..<0xFF>; below this size Unigram uses <unk> instead.
MIN_VOCAB_FOR_BYTE_FALLBACK = 512


@dataclass
class TrainResult:
    out_dir: str
    algo: str
    vocab_size: int           # ids in the written tokenizer, added tokens included
    special_tokens: list[str]
    byte_fallback: bool


def _build(algo: str, vocab_size: int, split_digits: bool, special_tokens: list[str]
           ) -> tuple[HFTokenizer, trainers.Trainer, bool]:
    """An untrained tokenizer pipeline plus its trainer. Returns (tokenizer, trainer, byte_fallback)."""
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if algo == "bpe":
        tok = HFTokenizer(models.BPE())
        # Digits first: it only splits, and ByteLevel must be last since it remaps bytes to chars.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
            # all 256 byte symbols are in the base vocabulary, so nothing is ever unknown
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        return tok, trainer, False
    if algo == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
        # cased BERT: clean control chars, put spaces around CJK ideographs, keep case and accents
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=False, lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(), *digits])
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                            continuing_subword_prefix="##", show_progress=False)
        return tok, trainer, False
    if algo == "unigram":
        byte_fallback = vocab_size >= MIN_VOCAB_FOR_BYTE_FALLBACK
        tok = HFTokenizer(models.Unigram())
        # Metaspace before Digits: "▁123" -> "▁", "1", "2", "3" (the other order would prepend ▁ to each digit)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), *digits])
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                      prepend_scheme="first")])
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - (256 if byte_fallback else 0), special_tokens=special_tokens,
            unk_token=UNK, show_progress=False)
        return tok, trainer, byte_fallback
    raise ValueError(f"algo={algo!r} is not one of {ALGORITHMS}")


def _add_byte_fallback(tok: HFTokenizer) -> None:
    """Rebuild a trained Unigram model with the 256 SentencePiece byte pieces <0x00>..<0xFF> and
    byte_fallback on, so unseen characters encode as their UTF-8 bytes instead of <unk>."""
    state = json.loads(tok.to_str())["model"]
    vocab = [(p, s) for p, s in state["vocab"]]
    have = {p for p, _ in vocab}
    floor = min(s for _, s in vocab) - 1.0  # bytes are the last resort, never preferred
    vocab += [(f"<0x{b:02X}>", floor) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok.model = models.Unigram(vocab, unk_id=state.get("unk_id"), byte_fallback=True)


def _validate(algo: str, vocab_size: int, special_tokens: Sequence[str]) -> None:
    if algo not in ALGORITHMS:
        raise ValueError(f"algo={algo!r} is not one of {ALGORITHMS}")
    floor = 256 + len(special_tokens) if algo == "bpe" else len(special_tokens) + 2
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {floor} for algo={algo!r}"
                         + (" (256 byte symbols + special tokens)" if algo == "bpe" else ""))


def _special_list(algo: str, special_tokens: Sequence[str] | None) -> list[str]:
    toks = list(DEFAULT_SPECIAL_TOKENS)
    if algo != "bpe":
        toks.insert(0, UNK)  # id 0 by convention
    for t in special_tokens or []:
        if t not in toks:
            toks.append(t)
    return toks


def train_tokenizer_from_iterator(texts: Iterable[str], algo: str, vocab_size: int, out_dir: str | os.PathLike,
                                  split_digits: bool = False, special_tokens: Sequence[str] | None = None,
                                  chat_template: str | None = None, model_max_length: int = 2048) -> TrainResult:
    """Train on an iterator of strings (e.g. generated text) and write the tokenizer folder."""
    specials = _special_list(algo, special_tokens)
    _validate(algo, vocab_size, specials)
    tok, trainer, byte_fallback = _build(algo, vocab_size, split_digits, specials)
    tok.train_from_iterator(texts, trainer=trainer)
    if byte_fallback:
        _add_byte_fallback(tok)
    return _write_folder(tok, algo, Path(out_dir), specials, chat_template, model_max_length, byte_fallback)


def train_tokenizer(files: Sequence[str], algo: str, vocab_size: int, out_dir: str | os.PathLike,
                    split_digits: bool = False, special_tokens: Sequence[str] | None = None,
                    chat_template: str | None = None, model_max_length: int = 2048) -> TrainResult:
    """Train on text files (one document per line is fine; lines are streamed) and write the folder."""
    if not files:
        raise ValueError("train_tokenizer needs at least one training file")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"training file {f} does not exist")
    return train_tokenizer_from_iterator(_iter_lines(files), algo, vocab_size, out_dir, split_digits,
                                         special_tokens, chat_template, model_max_length)


def _iter_lines(files: Sequence[str]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield from fh


def _write_folder(tok: HFTokenizer, algo: str, out: Path, specials: list[str], chat_template: str | None,
                  model_max_length: int, byte_fallback: bool) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    named = {
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None if algo == "bpe" else UNK,
    }
    added = tok.get_added_tokens_decoder()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        # bos is a document separator for packing, not something every encode() prepends.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())},
        **named,
        "extra_special_tokens": [t for t in specials if t not in named.values()],
        "chat_template": chat_template if chat_template is not None else CHATML_TEMPLATE,
    }
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in named.items() if v is not None}, f, ensure_ascii=False, indent=2)
    n = tok.get_vocab_size(with_added_tokens=True)
    logger.info("tokenizer (%s, %d ids) written to %s", algo, n, out)
    return TrainResult(str(out), algo, n, specials, byte_fallback)


def compression(tokenizer: Tokenizer | HFTokenizer | str | os.PathLike, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token on `texts` (higher = the tokenizer packs more text into each token)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_dir(tokenizer)
    n_bytes = n_tokens = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        if isinstance(tokenizer, Tokenizer):
            n_tokens += len(tokenizer.encode(t, add_special_tokens=False))
        else:
            n_tokens += len(tokenizer.encode(t, add_special_tokens=False).ids)
    if n_tokens == 0:
        raise ValueError("compression needs non-empty held-out text")
    return n_bytes / n_tokens


# ----------------------------------------------------------------------------------------------
# CLI glue: `lmstack tokenizer train ...` (the only place in this module that prints)
# ----------------------------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer")
    sub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = sub.add_parser("train", help="train a tokenizer and write an HF tokenizer folder")
    t.add_argument("files", nargs="+", help="training text files (UTF-8)")
    t.add_argument("--algo", choices=ALGORITHMS, default="bpe", help="bpe (byte-level), wordpiece, unigram")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--split-digits", action="store_true", help="split numbers into single-digit tokens")
    t.add_argument("--heldout", default=None, help="held-out text file for the bytes/token figure "
                   "(default: the training files)")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        heldout = [args.heldout] if args.heldout else list(args.files)
        if args.heldout and not Path(args.heldout).is_file():  # fail before spending time on training
            raise FileNotFoundError(f"held-out file {args.heldout} does not exist")
        res = train_tokenizer(args.files, args.algo, args.vocab_size, args.out, split_digits=args.split_digits)
        lines = [line for line in _iter_lines(heldout) if line.strip()]
        ratio = compression(res.out_dir, lines)
    except (ValueError, FileNotFoundError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = "held-out" if args.heldout else "training"
    print(f"tokenizer: {res.algo}, vocab size {res.vocab_size}, written to {res.out_dir}")
    print(f"compression on {src} text: {ratio:.3f} bytes/token")
    return 0
