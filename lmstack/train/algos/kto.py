"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired desirable / undesirable answers.

    lmstack train kto configs/kto.yaml

Data: `prompt` (or `messages`), `completion`, `label` (true = desirable). The reference point z0
is the KL between policy and reference estimated on mismatched pairs: each prompt of the batch
with the next example's completion (shift by one), detached and clamped at 0. Reference log-probs
come from a frozen copy of the starting checkpoint (or the LoRA base with adapters off), or are
precomputed once (`algo.precompute_ref: true`; then each example's mismatched completion is fixed
at load time, the next example's in the file, so its reference log-prob can be stored too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.algos import LossOutput, Stage, register
from lmstack.train.algos._pref import (EvalMetrics, KTOExample, Reference, autocast_for, check_kto_labels,
                                       collate_kto, completion_logps, load_kto, precompute, reference_for)
from lmstack.train.losses import kto_kl_estimate, kto_loss


@dataclass
class KTOOptions:
    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U (the paper: keep λ_D n_D / (λ_U n_U) in [1, 4/3])
    precompute_ref: bool = False
    ref_model: str = ""  # "" -> model.path (LoRA: the base with adapters off)

    def __post_init__(self) -> None:
        for k in ("beta", "desirable_weight", "undesirable_weight"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"algo.{k} must be > 0, got {getattr(self, k)}")


def _slice(batch: dict[str, torch.Tensor], s: slice) -> dict[str, torch.Tensor]:
    return {k: batch[k][s] for k in ("tokens", "positions", "labels", "lengths")}


@register
class KTO(Stage):
    name = "kto"
    Options = KTOOptions

    def load_dataset(self, paths: list[str], split: str) -> list[KTOExample]:
        data = load_kto(paths, self.tokenizer, self.cfg.data.max_len)
        if split == "train":
            check_kto_labels(data, str(list(paths)))
            n_d = sum(e.label for e in data)
            n_u = len(data) - n_d
            ratio = self.opts.desirable_weight * n_d / (self.opts.undesirable_weight * n_u)
            if not 1.0 <= ratio <= 4 / 3:
                logger.info("kto: %d desirable / %d undesirable examples; λ_D n_D / (λ_U n_U) = %.2f (the paper "
                            "suggests [1, 4/3]: tune algo.desirable_weight / undesirable_weight)", n_d, n_u, ratio)
        if self.opts.precompute_ref:
            for i, e in enumerate(data):
                e.kl_completion = data[(i + 1) % len(data)].completion
        self._datasets = getattr(self, "_datasets", []) + [data]
        return data

    def collate(self, examples: list[KTOExample]) -> dict[str, torch.Tensor]:
        return collate_kto(examples, self.pad_id)

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Module]:
        if self.cfg.training.batch_size < 2 and not self.opts.precompute_ref:
            raise ConfigError("KTO needs training.batch_size >= 2: its KL reference point pairs each prompt with "
                              "another example's completion from the same batch")
        self.ref = reference_for(self, model, device, self.opts.ref_model)
        if self.opts.precompute_ref:
            def store(chunk: list[KTOExample], lp: torch.Tensor) -> None:
                B = len(chunk)
                for e, a, b in zip(chunk, lp[:B].tolist(), lp[B:].tolist()):
                    e.ref, e.ref_kl = a, b

            for data in getattr(self, "_datasets", []):
                precompute(data, lambda ex: collate_kto(ex, self.pad_id), self.ref, store,
                           self.cfg.training.batch_size, device, lambda: autocast_for(self.cfg, device))
            self.ref = Reference(None)
        self._eval = EvalMetrics()
        return []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        B = batch["label"].shape[0]
        policy, _ = completion_logps(model, _slice(batch, slice(0, B)))
        with torch.no_grad():  # the KL point is detached: no graph for the mismatched rows
            policy_kl, _ = completion_logps(model, _slice(batch, slice(B, 2 * B)))
        if "ref" in batch:
            ref, ref_kl = batch["ref"], batch["ref_kl"]
        else:
            r = self.ref.logps(batch)
            ref, ref_kl = r[:B], r[B:]
        kl = kto_kl_estimate(policy_kl, ref_kl)
        if model.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # one reference point for the whole global batch (training only: eval shards may differ in
            # batch count between ranks, and a collective there would hang)
            dist.all_reduce(kl)
            kl = (kl / dist.get_world_size()).clamp(min=0)
        losses, metrics = kto_loss(policy, ref, batch["label"], kl, beta=self.opts.beta,
                                   desirable_weight=self.opts.desirable_weight,
                                   undesirable_weight=self.opts.undesirable_weight)
        if not model.training:
            self._eval.add({k: v for k, v in metrics.items() if k in ("kl", "rewards/margins")}, B)
        return LossOutput(losses.sum(), B, metrics)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {k.replace("rewards/", ""): v for k, v in self._eval.pop().items()}
