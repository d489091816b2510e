"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge / robust variants.

    lmstack train dpo configs/dpo.yaml

The policy starts from `model.path`; the reference model is the same checkpoint, frozen (or
`algo.ref_model`). Reference log-probs are computed live each step by a frozen copy, or once before
training with `algo.precompute_ref: true` (stored with the examples, after which the reference
model is freed: DPO then holds one model in memory). With LoRA the reference is the frozen base
with the adapters switched off, so no copy is ever made.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.algos import LossOutput, Stage, register
from lmstack.train.algos._pref import (PairStage, PrefExample, Reference, autocast_for, collate_pairs,
                                       completion_logps, precompute, reference_for)
from lmstack.train.losses import DPO_LOSS_TYPES, dpo_loss


@dataclass
class DPOOptions:
    beta: float = 0.1  # strength of the KL anchor to the reference (the paper's β)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (SLiC) | robust (rDPO)
    label_smoothing: float = 0.0  # assumed preference-flip rate ε (cDPO / robust DPO)
    precompute_ref: bool = False  # reference log-probs once before training, then free the reference
    ref_model: str = ""  # reference checkpoint; "" -> model.path (LoRA: the base with adapters off)
    nll_weight: float = 0.0  # + w * per-token NLL of the chosen answer (RPO, Pang et al. 2024); 0 = plain DPO

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"algo.beta must be > 0, got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"algo.loss_type {self.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(f"algo.label_smoothing applies to loss_type sigmoid or robust, not {self.loss_type!r}")
        if self.nll_weight < 0:
            raise ConfigError(f"algo.nll_weight must be >= 0, got {self.nll_weight}")


@register
class DPO(PairStage, Stage):
    name = "dpo"
    Options = DPOOptions

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Module]:
        self.ref = reference_for(self, model, device, self.opts.ref_model)
        if self.opts.precompute_ref:
            n = 0
            for data in getattr(self, "_datasets", []):
                precompute(data, lambda ex: collate_pairs(ex, self.pad_id), self.ref, _store_pairs,
                           self.cfg.training.batch_size, device, lambda: autocast_for(self.cfg, device))
                n += len(data)
            logger.info("dpo: reference log-probs precomputed for %d pairs; reference model released", n)
            self.ref = Reference(None)
        return []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        B = batch["margin"].shape[0]
        logps, counts = completion_logps(model, batch)  # (2B,): chosen rows, then rejected rows
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref = self.ref.logps(batch)
            ref_c, ref_r = ref[:B], ref[B:]
        pol_c, pol_r = logps[:B], logps[B:]
        if self.opts.loss_type == "ipo":
            # IPO's squared loss targets a margin of 1/(2β) per token: use length-averaged log-probs
            # (Azar et al. 2023 as implemented by its authors' follow-ups and TRL).
            n_c, n_r = counts[:B], counts[B:]
            pol_c, pol_r, ref_c, ref_r = pol_c / n_c, pol_r / n_r, ref_c / n_c, ref_r / n_r
        losses, metrics = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=self.opts.beta, loss_type=self.opts.loss_type,
                                   label_smoothing=self.opts.label_smoothing)
        if self.opts.nll_weight:
            nll = -logps[:B] / counts[:B]
            losses = losses + self.opts.nll_weight * nll
            metrics["nll_loss"] = nll.detach().mean()
        self._record(model, metrics, B)
        return LossOutput(losses.sum(), B, metrics)


def _store_pairs(chunk: list[PrefExample], lp: torch.Tensor) -> None:
    B = len(chunk)
    for e, c, r in zip(chunk, lp[:B].tolist(), lp[B:].tolist()):
        e.ref_chosen, e.ref_rejected = c, r
