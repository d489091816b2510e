"""Odds Ratio Preference Optimization (Hong et al. 2024): SFT loss + λ · log-odds-ratio term.

    lmstack train orpo configs/orpo.yaml

Reference-free (one model in memory) and meant to replace the SFT stage: the NLL on the chosen
answer teaches the format, the odds-ratio term pushes the rejected answer's odds down.
Paper default λ = 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmstack.config import ConfigError
from lmstack.train.algos import LossOutput, Stage, register
from lmstack.train.algos._pref import PairStage, completion_logps
from lmstack.train.losses import orpo_loss


@dataclass
class ORPOOptions:
    lam: float = 0.1  # λ, weight of the odds-ratio term (the paper's default)

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ConfigError(f"algo.lam must be > 0, got {self.lam}")


@register
class ORPO(PairStage, Stage):
    name = "orpo"
    Options = ORPOOptions

    def loss(self, model: nn.Module, batch) -> LossOutput:
        B = batch["margin"].shape[0]
        logps, counts = completion_logps(model, batch)
        losses, metrics = orpo_loss(logps[:B], logps[B:], counts[:B], counts[B:], lam=self.opts.lam)
        self._record(model, metrics, B)
        return LossOutput(losses.sum(), B, metrics)
