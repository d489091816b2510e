"""A large byte-level BPE tokenizer for the structured-output benchmarks, built here (no hub download).

`bpe_tokenizer(vocab_size)` trains a GPT-2 / Qwen2.5-style byte-level BPE (ByteLevel pre-tokenizer
with the GPT-2 split regex, 256 byte tokens, ChatML special tokens) with the `tokenizers` library on
generated text: a Zipf-distributed lexicon of pseudo-words (syllables, capitalised and
space-prefixed variants), numbers, JSON and code fragments, punctuation runs and CJK characters. What
matters to a grammar engine is the shape of the vocabulary (how many tokens, how long, how they
share prefixes, how many start with a space / quote / digit / brace), and a trained BPE has the real
shape: every token is a merge of two shorter ones. The result is cached under the system temp dir,
keyed by the vocabulary size (~1-2 minutes to train 150k tokens on 2 cores, once).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CONS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "x",
         "y", "z", "ch", "sh", "th", "st", "tr", "pl", "br", "gr", "sp", "cl", "fl", "ph", "wh", "str"]
_VOW = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo", "y", "ie", "au"]
_CODA = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "x", "rd", "ts", "ble", "tion", "ing",
         "ed", "er", "ly", "ment", "ness"]
_PUNCT = list(".,;:!?()[]{}<>\"'`-_=+*/\\|&^%$#@~") + ["->", "==", "!=", "<=", ">=", "::", "...", "//", "/*",
                                                       "*/", "\"\"", "{}", "[]", "()", "\\n", "\\\""]


def _word(rng: random.Random) -> str:
    n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
    return "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(n)) + rng.choice(_CODA)


def _corpus(vocab_size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lexicon = list({_word(rng) for _ in range(vocab_size * 2)})
    rng.shuffle(lexicon)
    lines = []
    # Zipf counts: word r appears ~ C / (r + 10) times, at least twice (so BPE can merge it whole)
    for r, w in enumerate(lexicon):
        c = max(2, int(4 * len(lexicon) / (r + 10) ** 1.1 * 10))
        form = rng.random()
        if form < 0.15:
            w = w.capitalize()
        elif form < 0.18:
            w = w.upper()
        lines.append(" ".join([w] * min(c, 12)))
        lines.append(" ".join([" " + w] * min(c, 12)))
    for _ in range(vocab_size // 2):
        k = rng.randrange(8)
        if k == 0:
            lines.append(str(rng.randrange(10 ** rng.randrange(1, 7))))
        elif k == 1:
            lines.append(f"{rng.uniform(-1000, 1000):.{rng.randrange(1, 5)}f}")
        elif k == 2:
            obj = {_word(rng): rng.choice([_word(rng), rng.randrange(100), True, None, [1, 2]]) for _ in range(3)}
            lines.append(json.dumps(obj, indent=rng.choice([None, 2])))
        elif k == 3:
            lines.append(f"def {_word(rng)}_{_word(rng)}(self, {_word(rng)}):\n    return {_word(rng)}.{_word(rng)}()\n")
        elif k == 4:
            lines.append("".join(rng.choice(_PUNCT) for _ in range(rng.randrange(1, 4))))
        elif k == 5:
            lines.append("".join(chr(rng.randrange(0x4E00, 0x4E00 + 3000)) for _ in range(rng.randrange(1, 4))))
        elif k == 6:
            lines.append(f'"{_word(rng)}": "{_word(rng)}",')
        else:
            lines.append(" " * rng.randrange(1, 9) + _word(rng))
    return lines


def bpe_tokenizer(vocab_size: int, cache_dir: str | Path | None = None) -> Tokenizer:
    """A trained byte-level BPE with exactly `vocab_size` tokens (specials included), cached on disk."""
    d = Path(cache_dir or tempfile.gettempdir()) / "lmstack_bench_bpe"
    path = d / f"bpe_{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        raise RuntimeError(f"the generated corpus gave only {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok
