"""Run checkpoints: save, list and load them (everything a resume needs to continue exactly)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import ConfigError
from lmstack.train.data import ResumableSampler
from lmstack.train.distributed import DistInfo, barrier

CKPT_DIR = "checkpoints"


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
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


def save_checkpoint(run_dir: Path, step: int, di: DistInfo, named: list[tuple[str, nn.Parameter]],
                    optimizer: torch.optim.Optimizer, scheduler: Any, sampler_state: dict[str, int],
                    rng: dict[str, Any], tokens_seen: int, keep: int) -> Path:
    root = run_dir / CKPT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if di.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier(di)
    torch.save(rng, tmp / f"rng_rank{di.rank}.pt")
    if di.main:
        save_file(_trainable_state(named), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(),
                 "tokens_seen": tokens_seen, "world": di.world}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    barrier(di)
    if di.main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(di)
    return final


def load_checkpoint(ckpt: Path, di: DistInfo, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                    scheduler: Any, sampler: ResumableSampler) -> dict[str, Any]:
    """Restore parameters, optimizer, schedule, data position and RNG; returns trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("world", 1) != di.world:
        raise ConfigError(f"{ckpt} was written by {state.get('world')} processes; resuming with "
                          f"{di.world} would change the data order")
    sd = load_file(str(ckpt / "trainable.safetensors"))
    names = {n for n, _ in named}
    if set(sd) != names:
        raise ConfigError(f"{ckpt}: checkpoint parameters do not match this run's trainable parameters "
                          f"(missing {sorted(names - set(sd))[:3]}, unexpected {sorted(set(sd) - names)[:3]})")
    with torch.no_grad():
        for n, p in named:
            p.copy_(sd[n].to(p.dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=di.device, weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    rng_file = ckpt / f"rng_rank{di.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
