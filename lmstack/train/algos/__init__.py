"""Training stages: each is a small class with `collate()` + `loss(model, batch)` (+ optional hooks).

The loop (lmstack/train/loop.py) owns everything else. A stage is looked up by name: `lmstack
train <name>` imports `lmstack.train.algos.<name>`, whose `@register`-decorated `Stage` subclass
has `name = "<name>"`; so adding `rm.py` with `@register class RewardModel(Stage): name = "rm"`
makes `lmstack train rm` work without touching this file.

Contract (all hooks but `load_dataset`, `collate` and `loss` are optional):
- `Options`: a dataclass of the stage's own settings, read from the config's `algo:` section
  (validated like every other section; `algo.beta=0.2` on the command line).
- `load_dataset(paths, split) -> list`: examples (any picklable objects; the sampler indexes them).
- `collate(examples) -> dict[str, Tensor]`: one micro-batch; the loop moves tensors to the device.
- `loss(model, batch) -> LossOutput(total, count, metrics)`: `total` is a SUM over the units the
  stage normalises by (target tokens for SFT, pairs for DPO ...) and `count` is how many units it
  covers. The loop divides by the count summed over the whole accumulation window and all ranks,
  so the step's loss is the same however the window is split into micro-batches and processes.
- `build_model(cfg, device) -> nn.Module`: a different model (e.g. a reward model with a score head).
- `setup(model, device) -> list[nn.Module]`: called once after the model is built (LoRA applied);
  load reference models here (not trained, not saved) and return EXTRA trainable modules (value
  heads); the loop optimises, checkpoints and restores them with the model.
- `rollout(model, examples) -> list[batch]`: online stages (PPO, GRPO) turn a list of sampled
  prompts into ready micro-batches (possibly several epochs' worth); the loop feeds them to
  `loss` grad_accum at a time, one optimizer step each, and calls `rollout` again when they run out.
- `evaluate(model) -> dict[str, float]`: extra eval metrics (accuracy ...), logged at eval time.
- `save_final(model, out_dir)`: extra files next to the final model (e.g. a value head).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lmstack.config import ConfigError

if TYPE_CHECKING:
    from lmstack.train.config import TrainConfig


class LossOutput(NamedTuple):
    total: torch.Tensor  # scalar, a sum over `count` units (this is what gets back-propagated)
    count: torch.Tensor | float  # number of units in `total` (tokens, pairs, ...)
    metrics: dict[str, Any]  # floats or 0-d tensors, averaged over micro-batches for logging


@dataclass
class NoOptions:
    """Stages without options accept an empty `algo:` section only."""


class Stage:
    name: str = ""
    Options: type = NoOptions

    def __init__(self, cfg: "TrainConfig", tokenizer: Any) -> None:
        from lmstack.train.config import build

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.opts = build(self.Options, dict(cfg.algo), "algo")

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        return int(tok.eos_token_ids[0]) if tok.eos_token_ids else 0

    def load_dataset(self, paths: list[str], split: str) -> list:
        raise NotImplementedError

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError


_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def _module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def available_stages() -> list[str]:
    for name in _module_names():
        _try_import(name)
    return sorted(_REGISTRY)


def _try_import(name: str) -> None:
    try:
        importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise


def get_stage(name: str) -> type[Stage]:
    if name not in _REGISTRY:
        _try_import(name)
    if name not in _REGISTRY:
        import difflib

        names = available_stages()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown training stage {name!r}{hint} (available: {names})")
    return _REGISTRY[name]


__all__ = ["LossOutput", "NoOptions", "Stage", "register", "get_stage", "available_stages"]
