"""AdamW with decoupled weight decay on matrices only, and the warmup + decay learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from lmstack.train.config import OptimSection


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress_
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress_))


def make_optimizer(params: list[tuple[str, nn.Parameter]], o: OptimSection, device: torch.device) -> torch.optim.AdamW:
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts (GPT-2/3 practice).
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kw: dict[str, Any] = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    # The fused kernel (CUDA, and CPU since torch 2.4) updates in place: fastest, and unlike foreach it
    # allocates no temporary copy of every parameter (which would raise peak memory by a model's size).
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kw)


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimSection,
                   total_steps: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """`total_steps` is read at every step: the loop knows the run's length only after loading the data."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, total_steps(), o.schedule, o.min_lr_ratio))
