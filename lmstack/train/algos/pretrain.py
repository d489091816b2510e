"""Pretraining: raw `text` documents packed into fixed-length sequences, loss on every next token."""
from __future__ import annotations

from lmstack.config import ConfigError
from lmstack.train.algos import register
from lmstack.train.algos.sft import SFT
from lmstack.train.data import Example, load_text


@register
class Pretrain(SFT):
    name = "pretrain"

    def load_dataset(self, paths: list[str], split: str) -> list[Example]:
        d = self.cfg.data
        if d.format not in ("auto", "text"):
            raise ConfigError(f"data.format {d.format!r}: the pretrain stage reads plain `{d.text_field}` documents")
        examples, _ = load_text(paths, self.tokenizer, d.max_len, d.packing, d.text_field)
        return examples
