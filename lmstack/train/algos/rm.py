"""Reward model: a scalar score head on the last non-padding token, Bradley-Terry loss on preference pairs.

    lmstack train rm configs/rm.yaml

`model.path` is a causal LM (its backbone is loaded and a fresh `score` Linear D -> 1 replaces the
LM head) or an existing reward model. The result is saved as a `*ForSequenceClassification` HF
folder with `pad_token_id` in config.json, so `transformers.AutoModelForSequenceClassification`
loads it and scores exactly as lmstack does: HF takes the score at the last token that is not
`pad_token_id`, which with right padding is the last token of the sequence.
Eval reports held-out preference accuracy (share of pairs scored chosen > rejected).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmstack.config import SEQ_CLS_ARCHITECTURES, ConfigError, ModelConfig
from lmstack.log import logger
from lmstack.train.algos import LossOutput, Stage, register
from lmstack.train.algos._pref import PairStage, has_lora
from lmstack.train.losses import bt_loss


@dataclass
class RMOptions:
    center_coef: float = 0.0  # reward-centering term η (Eisenstein et al. 2023); 0.01 is typical
    use_margin: bool = False  # use the data's `margin` column in the loss (Llama 2's margin loss)

    def __post_init__(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"algo.center_coef must be >= 0, got {self.center_coef}")


def load_reward_model(path: str | Path, pad_token_id: int | None = None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> nn.Module:
    """A score-head Transformer from a reward-model folder, or from a causal-LM folder (backbone loaded,
    score head freshly initialised N(0, initializer_range))."""
    from lmstack.model.loading import load_model
    from lmstack.model.transformer import Transformer

    mcfg = ModelConfig.from_hf(path)
    if mcfg.head == "score":
        if mcfg.num_labels != 1:
            raise ConfigError(f"{path}: a reward model needs num_labels = 1, the checkpoint has {mcfg.num_labels}")
        model = load_model(path, dtype=dtype, device=device)
        if pad_token_id is not None and model.config.pad_token_id is None:
            model.config = model.config.replace(pad_token_id=pad_token_id)
        return model
    if mcfg.model_type not in SEQ_CLS_ARCHITECTURES.values():
        raise ConfigError(f"{path}: reward models are supported for {sorted(set(SEQ_CLS_ARCHITECTURES.values()))}, "
                          f"not {mcfg.model_type!r}")
    lm = load_model(path, dtype=dtype, device=device)
    rcfg = mcfg.replace(head="score", num_labels=1,
                        pad_token_id=pad_token_id if pad_token_id is not None else mcfg.pad_token_id)
    if rcfg.pad_token_id is None:
        raise ConfigError(f"{path}: no pad token id (tokenizer or config.json): HF reward models need one to find "
                          "the last token")
    model = Transformer(rcfg).to(device=device, dtype=dtype)
    model.model.load_state_dict(lm.model.state_dict())
    del lm
    nn.init.normal_(model.score.weight, std=rcfg.initializer_range)
    return model.eval()


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R,) float32 scores at each row's last token (right padding: index lengths - 1)."""
    hidden = model(batch["tokens"], batch["positions"])  # (R, T, D)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, batch["lengths"] - 1]  # (R, D)
    w = model.score.weight if hasattr(model.score, "weight") else model.score.base.weight
    return model.compute_scores(last.to(w.dtype)).squeeze(-1).float()


@register
class RewardModel(PairStage, Stage):
    name = "rm"
    Options = RMOptions

    def build_model(self, cfg, device: torch.device) -> nn.Module:
        if cfg.model.path is None:
            raise ConfigError("rm: model.path must be a causal LM or reward-model folder (model.init is not supported)")
        bf16_base = cfg.lora is not None and (cfg.lora.qlora or cfg.training.precision == "bf16")
        return load_reward_model(cfg.model.path, self.pad_id, torch.bfloat16 if bf16_base else torch.float32, device)

    def load_dataset(self, paths: list[str], split: str):
        data = super().load_dataset(paths, split)
        pad = self.pad_id
        n = sum(pad in e.prompt or pad in e.chosen or pad in e.rejected for e in data)
        if n:
            logger.warning("rm: %d pairs contain the pad token id %d inside the text; HF's sequence classifier "
                           "would score them at an earlier token than lmstack", n, pad)
        return data

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Module]:
        if has_lora(model):  # the new head is trained in full next to the adapters
            model.score.float().requires_grad_(True)
        return []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        B = batch["margin"].shape[0]
        scores = sequence_scores(model, batch)  # (2B,)
        margin = batch["margin"] if self.opts.use_margin else None
        losses, metrics = bt_loss(scores[:B], scores[B:], margin=margin, center_coef=self.opts.center_coef)
        self._record(model, metrics, B)
        return LossOutput(losses.sum(), B, metrics)

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        if has_lora(model):
            # An adapter folder cannot carry the new score head: also write the merged reward model.
            from lmstack.model.lora import merge_lora
            from lmstack.model.loading import save_model

            merged = merge_lora(model, dequant_dtype=torch.float32)
            dst = Path(out_dir) / "merged"
            save_model(merged, dst, dtype=torch.float32)
            for f in Path(out_dir).iterdir():  # tokenizer files, already copied next to the adapter
                if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                    shutil.copy2(f, dst / f.name)
            logger.info("rm: merged reward model written to %s", Path(out_dir) / "merged")
