"""Run checkpoints: save, validate, list and load them (everything a resume needs to continue exactly).

`checkpoints/step_NNNNNNN/` holds
  trainable.safetensors    the trainable parameters by name (model.*, extra.*)
  optimizer.safetensors    the optimizer's state tensors, keyed state.<param index>.<name>
  rng_rank<R>.safetensors  each rank's torch / CUDA / numpy / python RNG states as integer tensors
  trainer_state.json       step, data position, lr schedule, optimizer hyper-parameters, world size
                           and the byte size of every file above; written last.
Nothing is pickled, so resuming a run directory from elsewhere runs no code from it (an old
rng_rank0.pt is never opened). A step directory appears only by renaming a complete, fsync'd
temporary one (then the parent is fsync'd), so a crash or power loss leaves either the previous
checkpoints or the new one. A damaged checkpoint all the same (a disk error, a copy cut short) is
skipped with a warning naming the file and what is wrong, and the run resumes from the newest
intact one -- as transformers' Trainer picks the last checkpoint, but falling back instead of
failing.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lmstack.checkpoint.safetensors_io import CheckpointError, load_safetensors, read_safetensors_header
from lmstack.config import ConfigError, check_value
from lmstack.log import logger
from lmstack.train.data import ResumableSampler
from lmstack.train.distributed import DistInfo, barrier

CKPT_DIR = "checkpoints"
STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
FORMAT = 2  # 1: optimizer.pt + rng_rank<R>.pt (pickles), no file sizes


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


# ----------------------------------------------------------------------------- durable files
def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some platforms / file systems cannot fsync a directory; files must succeed
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then every directory, deepest first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def commit_dir(tmp: Path, final: Path) -> None:
    """Make the fully written directory `tmp` appear as `final` in one rename, durably."""
    fsync_tree(tmp)
    if final.exists():  # a stale or damaged directory of the same name; a directory cannot be renamed over
        discard_dir(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def discard_dir(path: Path) -> None:
    """Rename away, then delete: an interrupted delete leaves a hidden `.del_*`, never a half checkpoint."""
    trash = path.with_name(f".del_{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file, fsync'd and renamed over `path` (then the directory is fsync'd)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ----------------------------------------------------------------------------- RNG states as tensors
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


def save_rng(path: Path, st: dict[str, Any]) -> None:
    """Every generator's state as integer tensors (+ the few scalars as JSON metadata): exact, no pickle."""
    py_version, py_words, py_gauss = st["python"]  # Mersenne Twister: 624 words + index; cached gauss
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = st["numpy"]
    tensors = {"python": torch.tensor(py_words, dtype=torch.int64), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "torch": st["torch"].clone()}
    for i, s in enumerate(st.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu().clone()
    meta = {"python_version": py_version, "python_gauss": py_gauss, "numpy_kind": np_kind, "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss), "cuda_devices": len(st.get("cuda", []))}
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})


def load_rng(path: Path) -> dict[str, Any]:
    _, meta_raw = read_safetensors_header(path)
    t = load_safetensors(path)
    try:
        meta = json.loads(meta_raw["rng"])
        st: dict[str, Any] = {
            "python": (meta["python_version"], tuple(int(x) for x in t["python"].tolist()), meta["python_gauss"]),
            "numpy": (meta["numpy_kind"], t["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                      meta["numpy_has_gauss"], meta["numpy_gauss"]),
            "torch": t["torch"],
        }
        if meta["cuda_devices"]:
            st["cuda"] = [t[f"cuda.{i}"] for i in range(meta["cuda_devices"])]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an lmstack RNG state ({type(e).__name__}: {e})") from None
    if t["torch"].dtype != torch.uint8 or len(st["python"][1]) != 625 or st["numpy"][1].shape != (624,):
        raise CheckpointError(f"{path}: RNG state tensors have the wrong dtype or length")
    return st


# ----------------------------------------------------------------------------- optimizer state as tensors
def _optimizer_split(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's optimizer state_dict -> (tensors for safetensors, the JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                values.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "values": values}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict[str, Any],
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for pid, vals in rest["values"].items():
        state.setdefault(int(pid), {}).update(vals)
    groups = []
    for saved, live in zip(rest["param_groups"], optimizer.param_groups):
        # JSON has no tuples: give back the live optimizer's type (AdamW's betas)
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- listing and validation
def _step_of(p: Path) -> int | None:
    name = p.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() and p.is_dir() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every step directory, oldest first, intact or not (see `checkpoint_problem`)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _step_of(p) is not None), key=_step_of)  # type: ignore[arg-type, return-value]


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json with every field the resume uses type-checked; errors name the file and field."""
    try:
        text = path.read_text(encoding="utf-8")
        state = json.loads(text)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {'empty file' if not path.stat().st_size else f'invalid JSON ({e})'}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format', 1)!r}, expected {FORMAT}: written by an "
                              "older lmstack, whose optimizer.pt / rng_rank*.pt are pickles, which are not loaded")
    try:
        for key, kind in (("step", int), ("tokens_seen", int), ("world", int), ("sampler", dict), ("scheduler", dict),
                          ("optimizer", dict), ("files", dict)):
            check_value(f"{path}: {key}", state.get(key), kind, lo=0 if kind is int else None)
        for key in ("epoch", "position"):
            check_value(f"{path}: sampler.{key}", state["sampler"].get(key), int, lo=0)
        for key, kind in (("param_groups", list), ("values", dict)):
            check_value(f"{path}: optimizer.{key}", state["optimizer"].get(key), kind)
        for name, size in state["files"].items():
            check_value(f"{path}: files.{name}", size, int, lo=0)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return state


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory (naming the file), or None when it is intact.

    Reads only trainer_state.json and the safetensors headers: a file missing, of another size than
    recorded (truncated, or overwritten), or whose header does not describe it."""
    try:
        state = read_trainer_state(ckpt / STATE)
        expected = [TRAINABLE, OPTIMIZER] + [_rng_file(r) for r in range(state["world"])]
        for name in expected:
            p = ckpt / name
            if name not in state["files"]:
                return f"{ckpt / STATE}: files lists no {name}"
            if not p.is_file():
                return f"{p}: file is missing"
            size = p.stat().st_size
            if size != state["files"][name]:
                return f"{p}: {size} bytes, but {STATE} recorded {state['files'][name]}: truncated or overwritten"
            read_safetensors_header(p)
    except CheckpointError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: Path, step: int, di: DistInfo, named: list[tuple[str, nn.Parameter]],
                    optimizer: torch.optim.Optimizer, scheduler: Any, sampler_state: dict[str, int],
                    rng: dict[str, Any], tokens_seen: int, keep: int) -> Path:
    """Write checkpoints/step_<step> (every rank its RNG file, rank 0 the rest) and drop checkpoints
    beyond the newest `keep` (0: keep all)."""
    root = run_dir / CKPT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if di.main:
        if root.is_dir():  # leftovers of saves or deletes that a crash cut short
            for p in root.iterdir():
                if p.name.startswith((".tmp_step_", ".del_")):
                    shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier(di)
    save_rng(tmp / _rng_file(di.rank), rng)
    if di.main:
        save_file({n: p.detach().cpu().contiguous().clone() for n, p in named}, str(tmp / TRAINABLE))
        tensors, opt_rest = _optimizer_split(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER))
    barrier(di)  # every rank's RNG file is written
    if di.main:
        files = [TRAINABLE, OPTIMIZER] + [_rng_file(r) for r in range(di.world)]
        state = {"format": FORMAT, "step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(),
                 "tokens_seen": tokens_seen, "world": di.world, "optimizer": opt_rest,
                 "files": {f: (tmp / f).stat().st_size for f in files}}
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        commit_dir(tmp, final)
        if keep:
            # only checkpoints up to this one count: any later step directory is one a resume skipped as
            # damaged, and it must not push intact ones out
            older = [c for c in list_checkpoints(run_dir) if _step_of(c) <= step]  # type: ignore[operator]
            for old in older[:-keep]:
                discard_dir(old)
    barrier(di)
    return final


def load_checkpoint(ckpt: Path, di: DistInfo, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                    scheduler: Any, sampler: ResumableSampler) -> dict[str, Any]:
    """Restore parameters, optimizer, schedule, data position and RNG; returns trainer_state.json.

    Everything is read and checked before anything is changed, so a file that fails here leaves the
    run as it was (and the caller can fall back to an older checkpoint)."""
    state = read_trainer_state(ckpt / STATE)
    if state["world"] != di.world:
        raise ConfigError(f"{ckpt} was written by {state['world']} processes; resuming with "
                          f"{di.world} would change the data order")
    sd = load_safetensors(ckpt / TRAINABLE)
    names = {n for n, _ in named}
    if set(sd) != names:
        raise ConfigError(f"{ckpt}: checkpoint parameters do not match this run's trainable parameters "
                          f"(missing {sorted(names - set(sd))[:3]}, unexpected {sorted(set(sd) - names)[:3]})")
    for n, p in named:
        if sd[n].shape != p.shape:
            raise ConfigError(f"{ckpt / TRAINABLE}: {n} has shape {tuple(sd[n].shape)}, this run's is {tuple(p.shape)}")
    opt_sd = _optimizer_join(load_safetensors(ckpt / OPTIMIZER), state["optimizer"], optimizer)
    rng = load_rng(ckpt / _rng_file(di.rank))
    with torch.no_grad():
        for n, p in named:
            p.copy_(sd[n].to(p.dtype))
    try:
        optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{ckpt / OPTIMIZER}: does not fit this run's optimizer ({e})") from None
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(rng)
    return state


def load_latest_checkpoint(run_dir: Path, di: DistInfo, named: list[tuple[str, nn.Parameter]],
                           optimizer: torch.optim.Optimizer, scheduler: Any,
                           sampler: ResumableSampler) -> tuple[Path, dict[str, Any]] | None:
    """Resume from the newest intact checkpoint, warning about each damaged one skipped on the way.

    None when the run has no checkpoint; a ConfigError listing every problem when none is intact
    (starting over would silently throw the run away)."""
    ckpts = list_checkpoints(run_dir)
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                return ckpt, load_checkpoint(ckpt, di, named, optimizer, scheduler, sampler)
            except CheckpointError as e:  # a tensor unreadable past its header
                problem = str(e)
        problems.append(problem)
        logger.warning("skipping checkpoint %s: %s", ckpt.name, problem)
    if ckpts:
        raise ConfigError(f"{run_dir}: no intact checkpoint to resume from ({'; '.join(problems)}). Move the "
                          "damaged checkpoints away to start over, or choose a new training.out_dir")
    return None
