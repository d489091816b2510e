"""Simple Preference Optimization (Meng et al. 2024): length-normalised log-prob reward with a target margin.

    lmstack train simpo configs/simpo.yaml

r(x, y) = β/|y| · log π(y|x); loss = -log σ(r_w - r_l - γ). No reference model. The paper's β is
large (2.0-2.5, because the reward is a per-token average) and γ/β around 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmstack.config import ConfigError
from lmstack.train.algos import LossOutput, Stage, register
from lmstack.train.algos._pref import PairStage, completion_logps
from lmstack.train.losses import simpo_loss


@dataclass
class SimPOOptions:
    beta: float = 2.0  # reward scale β
    gamma_beta_ratio: float = 0.5  # target margin γ = β · gamma_beta_ratio
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"algo.beta must be > 0, got {self.beta}")
        if self.gamma_beta_ratio < 0:
            raise ConfigError(f"algo.gamma_beta_ratio must be >= 0, got {self.gamma_beta_ratio}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@register
class SimPO(PairStage, Stage):
    name = "simpo"
    Options = SimPOOptions

    def loss(self, model: nn.Module, batch) -> LossOutput:
        B = batch["margin"].shape[0]
        logps, counts = completion_logps(model, batch)
        losses, metrics = simpo_loss(logps[:B], logps[B:], counts[:B], counts[B:], beta=self.opts.beta,
                                     gamma_beta_ratio=self.opts.gamma_beta_ratio,
                                     label_smoothing=self.opts.label_smoothing)
        self._record(model, metrics, B)
        return LossOutput(losses.sum(), B, metrics)
