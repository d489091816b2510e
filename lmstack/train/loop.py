"""THE training loop: one `train(stage, cfg)` for pretraining, SFT and every alignment stage.

It owns gradient accumulation, clipping, bf16 autocast, gradient checkpointing, evaluation and the
order of things; the optimizer and schedule (optim.py), checkpoints with exact resume
(checkpoint.py), metrics (metrics.py) and data parallelism (distributed.py) live beside it. Stages
only say how to batch and what the loss is (lmstack/train/algos/__init__.py).

Accumulation is exact: a stage returns a loss SUM and its unit count; gradients of the sums are
accumulated over the window and then divided by the window's total count (all ranks), so
batch 8 x accum 1, batch 1 x accum 8 and 2 processes x accum 4 all take the same step.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmstack.checkpoint.memory import check_fits_in_memory
from lmstack.config import ConfigError, ModelConfig
from lmstack.log import logger, progress
from lmstack.malloc import keep_freed_memory, release_freed_memory
from lmstack.train.algos import LossOutput, Stage, get_stage
from lmstack.train.checkpoint import (atomic_write_text, list_checkpoints, load_latest_checkpoint, rng_state,
                                      save_checkpoint)
from lmstack.train.config import InitConfig, TrainConfig, check_resume_compatible, config_to_yaml
from lmstack.train.data import ResumableSampler, split_eval
from lmstack.train.distributed import DistInfo, all_reduce_, all_reduce_grads, init_distributed
from lmstack.train.export import save_final
from lmstack.train.metrics import METRICS, MetricsWriter, plot_run
from lmstack.train.optim import make_optimizer, make_scheduler


# ----------------------------------------------------------------------------- model building
def _init_model_config(init: InitConfig, tokenizer: Any) -> ModelConfig:
    vocab = init.vocab_size or tokenizer.vocab_size
    eos = tokenizer.eos_token_ids
    common = dict(
        vocab_size=vocab, hidden_size=init.hidden_size, num_layers=init.num_layers, num_heads=init.num_heads,
        max_position_embeddings=init.max_position_embeddings, tie_embeddings=init.tie_embeddings,
        initializer_range=init.initializer_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None, pad_token_id=tokenizer.pad_token_id,
    )
    if init.family == "gpt2":
        return ModelConfig(model_type="gpt2", intermediate_size=init.intermediate_size or 4 * init.hidden_size,
                           num_kv_heads=init.num_heads, pos="learned", norm="layer", act="gelu_new",
                           gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True, norm_eps=1e-5, **common)
    # SwiGLU has three matrices: ~8/3 * hidden keeps the MLP's parameter count at a 4x plain MLP's.
    inter = init.intermediate_size or int(math.ceil(8 * init.hidden_size / 3 / 64) * 64)
    return ModelConfig(model_type=init.family, intermediate_size=inter, num_kv_heads=init.num_kv_heads or init.num_heads,
                       rope_theta=init.rope_theta, norm_eps=1e-6 if init.family == "qwen2" else 1e-5,
                       qkv_bias=init.family == "qwen2", **common)


def build_model(cfg: TrainConfig, tokenizer: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a run starts from: an HF folder (`model.path`) or a freshly initialised `model.init`."""
    from lmstack.model.transformer import Transformer

    if cfg.model.init is not None:
        mcfg = _init_model_config(cfg.model.init, tokenizer)
        if mcfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.init.vocab_size {mcfg.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size}")
        n = mcfg.num_parameters()
        check_fits_in_memory(n * torch.float32.itemsize, "cpu", f"model.init: {n:,} parameters in float32")
        model = Transformer(mcfg)
        model.init_weights()
        return model.to(device=device, dtype=dtype)
    from lmstack.model.loading import load_model

    return load_model(cfg.model.path, dtype=dtype, device=device)


def _prepare_model(cfg: TrainConfig, model: nn.Module) -> None:
    """LoRA / QLoRA module swaps and gradient checkpointing, after the model is built."""
    if cfg.lora is not None:
        from lmstack.model.lora import apply_lora

        if cfg.lora.qlora:
            from lmstack.model.quant import quantize_embeddings_nf4, quantize_model

            # QLoRA: the frozen base is stored as NF4 and computed in bf16; lm_head and the embedding
            # stay dense unless lora.quantize_embeddings
            quantize_model(model, "nf4", skip=("lm_head", "score"), compute_dtype=torch.bfloat16)
            if cfg.lora.quantize_embeddings:
                quantize_embeddings_nf4(model, torch.bfloat16)
            release_freed_memory()  # the 16-bit weights just replaced would otherwise stay resident
        names = apply_lora(model, cfg.lora)
        logger.info("LoRA: %d modules adapted (r=%d, alpha=%g%s)", len(names), cfg.lora.r, cfg.lora.alpha,
                    (", QLoRA NF4 base" + (" and embeddings" if cfg.lora.quantize_embeddings else ""))
                    if cfg.lora.qlora else "")
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing = True


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.training.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _num_tokens(batch: dict[str, Any]) -> int:
    t = batch.get("tokens") if isinstance(batch, dict) else None
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _scalar(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


def forward_backward(stage: Stage, model: nn.Module, micro_batches: list[dict[str, Any]], autocast_ctx,
                     params: list[nn.Parameter], di: DistInfo) -> tuple[float, float, dict[str, float]]:
    """Accumulate gradients of the window's loss = sum(totals) / sum(counts) over micro-batches and ranks.

    Returns (window loss, total count, averaged stage metrics). Gradients of the raw sums are
    accumulated, all-reduced (data parallel) and then divided by the global count.
    """
    total = torch.zeros(2, dtype=torch.float64)  # [loss sum, count]
    metrics: dict[str, float] = {}
    for mb in micro_batches:
        with autocast_ctx:
            out: LossOutput = stage.loss(model, mb)
        out.total.backward()
        total += torch.tensor([_scalar(out.total), _scalar(out.count)], dtype=torch.float64)
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + _scalar(v) / len(micro_batches)
    if di.world > 1:
        total = total.to(di.device if di.device.type == "cuda" else "cpu")
        all_reduce_(total, di)
        total = total.cpu()
    all_reduce_grads(params, di)
    count = float(total[1])
    if count <= 0:
        raise RuntimeError("this step's batches contain no target units (all labels masked?)")
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)
    return float(total[0]) / count, count, metrics


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    interrupted: bool
    metrics: list[dict[str, Any]]


class _Run:
    """The state of one run: everything a checkpoint captures and restores."""

    def __init__(self, cfg: TrainConfig, stage: Stage, model: nn.Module, extra: list[nn.Module],
                 sampler: ResumableSampler, di: DistInfo) -> None:
        self.cfg, self.stage, self.model, self.di, self.sampler = cfg, stage, model, di, sampler
        if di.device.type == "cpu":
            # every step allocates the same large activations and logits chunks again; reusing the
            # freed heap instead of page-faulting fresh mmaps measured +19% tokens/s (full SFT,
            # SmolLM2-135M shape, seq 512 x 8, bf16) at 5% lower peak RSS (lmstack/malloc.py)
            keep_freed_memory()
        self.extra = nn.ModuleList(extra)
        self.named = [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
        self.named += [(f"extra.{n}", p) for n, p in self.extra.named_parameters() if p.requires_grad]
        if not self.named:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.params = [p for _, p in self.named]
        self.optimizer = make_optimizer(self.named, cfg.optim, di.device)
        self.max_steps = 0
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, lambda: self.max_steps)
        self.step = 0
        self.tokens_seen = 0
        self.buffer: list[dict[str, Any]] = []  # rollout micro-batches not consumed yet (online stages)

    def optimizer_step(self, micro: list[dict[str, Any]], autocast_ctx) -> tuple[float, float, float, float, dict]:
        """One optimizer step on an accumulation window: (loss, count, grad norm, lr used, stage metrics)."""
        loss, count, smetrics = forward_backward(self.stage, self.model, micro, autocast_ctx, self.params, self.di)
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: loss is {loss}; lower optim.lr or check the data")
        max_norm = self.cfg.training.max_grad_norm
        if max_norm > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:
            gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, count, gnorm, lr, smetrics

    # -- save / load -------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int, sampler_state: dict[str, int], rng: dict[str, Any]) -> Path:
        return save_checkpoint(run_dir, step, self.di, self.named, self.optimizer, self.scheduler, sampler_state,
                               rng, self.tokens_seen, self.cfg.training.keep_checkpoints)

    def resume(self, run_dir: Path) -> Path | None:
        """Load the newest intact checkpoint of `run_dir` (None: nothing to resume)."""
        found = load_latest_checkpoint(run_dir, self.di, self.named, self.optimizer, self.scheduler, self.sampler)
        if found is None:
            return None
        ckpt, state = found
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        return ckpt


# ----------------------------------------------------------------------------- the loop
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(stage: Stage, data: list, batch_size: int, di: DistInfo, limit: int = 0) -> Iterator[dict[str, Any]]:
    """Sequential eval batches, this rank's shard."""
    shard = data[di.rank::di.world]
    for i, s in enumerate(range(0, len(shard), batch_size)):
        if limit and i >= limit:
            return
        yield stage.collate(shard[s: s + batch_size])


@torch.no_grad()
def evaluate(stage: Stage, model: nn.Module, data: list, cfg: TrainConfig, di: DistInfo) -> dict[str, float]:
    """eval_loss over `data` (offline stages) plus the stage's own `evaluate(model)` metrics."""
    was_training = model.training
    model.eval()
    res: dict[str, float] = {}
    if data and not hasattr(stage, "rollout"):  # online stages' eval data are prompts, not loss batches
        tot = torch.zeros(2, dtype=torch.float64)
        for mb in _batches(stage, data, cfg.training.batch_size, di, cfg.training.eval_batches):
            with _autocast(cfg, di.device):
                out = stage.loss(model, _to_device(mb, di.device))
            tot += torch.tensor([_scalar(out.total), _scalar(out.count)], dtype=torch.float64)
        all_reduce_(tot, di)
        res["eval_loss"] = float(tot[0] / max(tot[1], 1.0))
    if hasattr(stage, "evaluate"):
        res.update({f"eval_{k}" if not k.startswith("eval") else k: float(v) for k, v in stage.evaluate(model).items()})
    model.train(was_training)
    return res


def train(stage: Stage | str, cfg: TrainConfig, *, stop_at_step: int | None = None) -> TrainResult:
    """Run `stage` with `cfg` to training.max_steps (resuming from the run directory if it has a checkpoint).

    `stop_at_step`: stop after that optimizer step and save a checkpoint, as Ctrl-C does (tests and
    time-sliced schedulers use it).
    """
    from lmstack.tokenizer import Tokenizer

    tc = cfg.training
    di = init_distributed(tc.device)
    try:
        return _train(stage, cfg, di, Tokenizer.from_dir(cfg.model.tokenizer_dir), stop_at_step)
    finally:
        if di.owns_group:
            dist.destroy_process_group()


def _train(stage_arg: Stage | str, cfg: TrainConfig, di: DistInfo, tokenizer: Any, stop_at_step: int | None) -> TrainResult:
    tc = cfg.training
    out = Path(tc.out_dir)
    stage = get_stage(stage_arg)(cfg, tokenizer) if isinstance(stage_arg, str) else stage_arg
    if not cfg.stage:
        cfg.stage = stage.name

    # -- resume checks happen before any expensive work ---------------------------------------
    ckpts = list_checkpoints(out)
    if ckpts and not tc.resume:
        raise ConfigError(f"{out} already holds checkpoints; set training.resume=true to continue that run "
                          "or choose a new training.out_dir")
    check_resume_compatible(cfg, out)
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
    _seed_all(tc.seed)

    # -- data --------------------------------------------------------------------------------
    train_data = stage.load_dataset(list(cfg.data.train), "train")
    eval_data = stage.load_dataset(list(cfg.data.eval), "eval") if cfg.data.eval else []
    if not cfg.data.eval and cfg.data.eval_fraction > 0:
        train_data, eval_data = split_eval(train_data, cfg.data.eval_fraction, tc.seed)
    sampler = ResumableSampler(len(train_data), tc.seed, cfg.data.shuffle, di.rank, di.world)
    per_step = tc.batch_size * tc.grad_accum * di.world

    # -- model -------------------------------------------------------------------------------
    # LoRA keeps a frozen base: store it in bf16 when computing in bf16 (adapters stay fp32).
    base_dtype = torch.bfloat16 if cfg.lora is not None and (cfg.lora.qlora or tc.precision == "bf16") else torch.float32
    if hasattr(stage, "build_model"):
        model = stage.build_model(cfg, di.device)
    else:
        model = build_model(cfg, tokenizer, di.device, base_dtype)
    _prepare_model(cfg, model)
    model.to(di.device)
    extra = list(stage.setup(model, di.device)) if hasattr(stage, "setup") else []
    for m in extra:
        m.to(di.device)
    model.train()
    run = _Run(cfg, stage, model, extra, sampler, di)
    if di.world > 1:  # every rank starts from rank 0's weights (random LoRA A, fresh init)
        with torch.no_grad():
            for p in run.params:
                dist.broadcast(p.data, src=0)
    online = hasattr(stage, "rollout")
    can_eval = bool(eval_data) or hasattr(stage, "evaluate")
    if tc.max_steps:
        run.max_steps = tc.max_steps
    else:
        run.max_steps = max(1, math.ceil(tc.epochs * len(train_data) / per_step))
    n_train = sum(p.numel() for p in run.params)
    logger.info("stage %s: %d train / %d eval examples, %d steps of %d sequences, %.2fM trainable parameters",
                stage.name, len(train_data), len(eval_data), run.max_steps, per_step, n_train / 1e6)

    resumed = run.resume(out) if ckpts else None
    if resumed is not None:
        logger.info("resumed from %s (step %d)", resumed, run.step)
    metrics = MetricsWriter(out / METRICS, di.main, run.step if resumed is not None else None)

    def save(sampler_state: dict[str, int], rng: dict[str, Any]) -> None:
        metrics.sync()  # the rows up to this step are on disk when the checkpoint is
        run.save(out, run.step, sampler_state, rng)

    # -- train -------------------------------------------------------------------------------
    bar = progress(total=run.max_steps, initial=run.step, desc=stage.name, disable=None if di.main else True)
    interrupted = False
    t_last, tok_last = time.perf_counter(), run.tokens_seen
    step_start_state = (sampler.state_dict(), rng_state())
    try:
        while run.step < run.max_steps:
            step_start_state = (sampler.state_dict(), rng_state())
            micro = []
            for _ in range(tc.grad_accum):
                if online:
                    if not run.buffer:
                        prompts = [train_data[i] for i in sampler.next(tc.batch_size * tc.grad_accum)]
                        run.buffer = list(stage.rollout(model, prompts))
                    micro.append(_to_device(run.buffer.pop(0), di.device))
                else:
                    micro.append(_to_device(stage.collate([train_data[i] for i in sampler.next(tc.batch_size)]), di.device))
            loss, count, gnorm, lr, smetrics = run.optimizer_step(micro, _autocast(cfg, di.device))
            ntok = sum(_num_tokens(mb) for mb in micro) * di.world
            run.tokens_seen += ntok

            if run.step % tc.log_every == 0 or run.step == run.max_steps:
                now = time.perf_counter()
                tps = (run.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, run.tokens_seen
                row = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "count": count,
                       "tokens": run.tokens_seen, "tokens_per_s": tps,
                       "epoch": sampler.epoch + sampler.position / sampler.n, **smetrics}
                metrics.write(row)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            bar.update(1)
            if can_eval and tc.eval_every and run.step % tc.eval_every == 0 and run.step < run.max_steps:
                metrics.write({"step": run.step, **evaluate(stage, model, eval_data, cfg, di)})
            if tc.save_every and run.step % tc.save_every == 0 and run.step < run.max_steps:
                save(sampler.state_dict(), rng_state())
            if stop_at_step is not None and run.step >= stop_at_step and run.step < run.max_steps:
                save(sampler.state_dict(), rng_state())
                interrupted = True
                break
    except KeyboardInterrupt:
        # Save the last completed step; the interrupted step's data and randomness are replayed on resume.
        run.optimizer.zero_grad(set_to_none=True)
        logger.warning("interrupted: saving a checkpoint at step %d in %s", run.step, out)
        if run.step > 0:
            save(*step_start_state)
        interrupted = True
    finally:
        bar.close()

    final_dir = None
    if not interrupted:
        if can_eval:
            metrics.write({"step": run.step, **evaluate(stage, model, eval_data, cfg, di)})
        if di.main:
            final_dir = save_final(cfg, stage, model, out)
            try:
                plot_run(out)
            except Exception as e:  # plotting must never lose a finished run
                logger.warning("could not plot %s: %s", out, e)
        save(sampler.state_dict(), rng_state())
    return TrainResult(out, final_dir, run.step, interrupted, metrics.rows)


