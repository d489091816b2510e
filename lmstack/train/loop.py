"""THE training loop: one `train(stage, cfg)` for pretraining, SFT and every alignment stage.

It owns AdamW, warmup + decay schedule, gradient accumulation, clipping, bf16 autocast, gradient
checkpointing, evaluation, checkpoints with exact resume, metrics, and data parallelism. Stages
only say how to batch and what the loss is (lmstack/train/algos/__init__.py).

Accumulation is exact: a stage returns a loss SUM and its unit count; gradients of the sums are
accumulated over the window and then divided by the window's total count (all ranks), so
batch 8 x accum 1, batch 1 x accum 8 and 2 processes x accum 4 all take the same step.

Data parallelism: under torchrun (WORLD_SIZE > 1) each rank takes its shard of every global batch
and gradients are summed with one bucketed all-reduce per optimizer step (gloo on CPU, NCCL on
GPU) -- DDP's arithmetic, done once per step instead of hooked into backward, which keeps the
stages free to call model parts (lm_head, value heads) outside `forward`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import ConfigError, ModelConfig
from lmstack.log import logger, progress
from lmstack.malloc import keep_freed_memory, release_freed_memory
from lmstack.train.algos import LossOutput, Stage, get_stage
from lmstack.train.config import InitConfig, TrainConfig, check_resume_compatible, config_to_yaml
from lmstack.train.data import ResumableSampler, split_eval

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS = "metrics.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this call created the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's env vars; start a process group when WORLD_SIZE > 1 (NCCL on GPU, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def _all_reduce_(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    if di.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_grads(params: list[nn.Parameter], di: DistInfo, bucket_numel: int = 1 << 24) -> None:
    """Sum gradients across ranks in flat buckets (a few large all-reduces instead of one per tensor)."""
    if di.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1).float() for g in bucket])  # (sum numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for g in bucket:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= bucket_numel:
            flush()
            size = 0
    flush()


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


# ----------------------------------------------------------------------------- optimisation
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


def make_optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts (GPT-2/3 practice).
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kw: dict[str, Any] = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # The fused kernel (CUDA, and CPU since torch 2.4) updates in place: fastest, and unlike foreach it
    # allocates no temporary copy of every parameter (which would raise peak memory by a model's size).
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kw)


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
        _all_reduce_(total, di)
        total = total.cpu()
    _all_reduce_grads(params, di)
    count = float(total[1])
    if count <= 0:
        raise RuntimeError("this step's batches contain no target units (all labels masked?)")
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)
    return float(total[0]) / count, count, metrics


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable_state(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in named}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "trainer_state.json").is_file()]
    return sorted(steps, key=lambda p: int(p.name.split("_")[1]))


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
        self.optimizer = make_optimizer(self.named, cfg, di.device)
        self.max_steps = 0
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, self.max_steps, o.schedule, o.min_lr_ratio))
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
        root = run_dir / CKPT_DIR
        final = root / f"step_{step:07d}"
        tmp = root / f".tmp_step_{step:07d}"
        if self.di.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        torch.save(rng, tmp / f"rng_rank{self.di.rank}.pt")
        if self.di.main:
            save_file(_trainable_state(self.named), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"step": step, "sampler": sampler_state, "scheduler": self.scheduler.state_dict(),
                     "tokens_seen": self.tokens_seen, "world": self.di.world}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        self._barrier()
        if self.di.main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            keep = self.cfg.training.keep_checkpoints
            if keep:
                for old in list_checkpoints(run_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("world", 1) != self.di.world:
            raise ConfigError(f"{ckpt} was written by {state.get('world')} processes; resuming with "
                              f"{self.di.world} would change the data order")
        sd = load_file(str(ckpt / "trainable.safetensors"))
        names = {n for n, _ in self.named}
        if set(sd) != names:
            raise ConfigError(f"{ckpt}: checkpoint parameters do not match this run's trainable parameters "
                              f"(missing {sorted(names - set(sd))[:3]}, unexpected {sorted(set(sd) - names)[:3]})")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(sd[n].to(p.dtype))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.di.device, weights_only=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        rng_file = ckpt / f"rng_rank{self.di.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    def _barrier(self) -> None:
        if self.di.world > 1:
            dist.barrier()


# ----------------------------------------------------------------------------- metrics
class MetricsWriter:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            # On resume, drop rows logged after the checkpoint (they will be recomputed).
            self.rows = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no metrics (is {run_dir} a training run directory?)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


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
        _all_reduce_(tot, di)
        res["eval_loss"] = float(tot[0] / max(tot[1], 1.0))
    if hasattr(stage, "evaluate"):
        res.update({f"eval_{k}" if not k.startswith("eval") else k: float(v) for k, v in stage.evaluate(model).items()})
    model.train(was_training)
    return res


def _save_final(cfg: TrainConfig, stage: Stage, model: nn.Module, tokenizer: Any, out: Path) -> Path:
    final = out / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    if cfg.lora is not None:
        from lmstack.model.lora import save_adapter
        from lmstack.train.export import write_adapter_info

        save_adapter(model, final, base_model_name_or_path=str(Path(cfg.model.path).resolve()) if cfg.model.path else "")
        write_adapter_info(final, cfg.lora.qlora, cfg.lora.quantize_embeddings)
    else:
        from lmstack.model.loading import save_model

        save_model(model, final)
    src = Path(cfg.model.tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (final / name).exists():
            shutil.copy2(src / name, final / name)
    if hasattr(stage, "save_final"):
        stage.save_final(model, final)
    return final


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
        (out / "config.yaml").write_text(config_to_yaml(cfg))
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

    if ckpts:
        run.load(ckpts[-1])
        logger.info("resumed from %s (step %d)", ckpts[-1], run.step)
    metrics = MetricsWriter(out / METRICS, di.main, run.step if ckpts else None)

    # -- train -------------------------------------------------------------------------------
    bar = progress(total=run.max_steps, initial=run.step, desc=stage.name, disable=None if di.main else True)
    interrupted = False
    t_last, tok_last = time.perf_counter(), run.tokens_seen
    step_start_state = (sampler.state_dict(), _rng_state())
    try:
        while run.step < run.max_steps:
            step_start_state = (sampler.state_dict(), _rng_state())
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
                run.save(out, run.step, sampler.state_dict(), _rng_state())
            if stop_at_step is not None and run.step >= stop_at_step and run.step < run.max_steps:
                run.save(out, run.step, sampler.state_dict(), _rng_state())
                interrupted = True
                break
    except KeyboardInterrupt:
        # Save the last completed step; the interrupted step's data and randomness are replayed on resume.
        run.optimizer.zero_grad(set_to_none=True)
        logger.warning("interrupted: saving a checkpoint at step %d in %s", run.step, out)
        if run.step > 0:
            run.save(out, run.step, *step_start_state)
        interrupted = True
    finally:
        bar.close()

    final_dir = None
    if not interrupted:
        if can_eval:
            metrics.write({"step": run.step, **evaluate(stage, model, eval_data, cfg, di)})
        if di.main:
            final_dir = _save_final(cfg, stage, model, tokenizer, out)
            try:
                plot_run(out)
            except Exception as e:  # plotting must never lose a finished run
                logger.warning("could not plot %s: %s", out, e)
        run.save(out, run.step, sampler.state_dict(), _rng_state())
    return TrainResult(out, final_dir, run.step, interrupted, metrics.rows)


# ----------------------------------------------------------------------------- plots
def plot_run(run_dir: str | Path) -> list[Path]:
    """PNG curves from metrics.jsonl: loss.png (train and eval loss) and metrics.png (everything else)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: skipping plots of %s (pip install matplotlib)", run_dir)
        return []
    rows = read_metrics(run_dir)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(r["step"])
            ys.append(float(v))
    written = []
    run = Path(run_dir)
    loss_keys = [k for k in ("loss", "eval_loss") if k in series]
    if loss_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in loss_keys:
            ax.plot(*series[k], marker="o" if k == "eval_loss" else None, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(run.name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=100)
        plt.close(fig)
        written.append(run / "loss.png")
    others = [k for k in series if k not in loss_keys and k not in ("tokens", "count", "epoch")]
    if others:
        cols = min(3, len(others))
        nrows = math.ceil(len(others) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
        for ax, k in zip(axes.flat, others):
            ax.plot(*series[k])
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(others):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(run / "metrics.png", dpi=100)
        plt.close(fig)
        written.append(run / "metrics.png")
    return written
