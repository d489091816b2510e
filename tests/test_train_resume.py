"""Resuming is safe and falls back: nothing in a run directory is unpickled, every checkpoint file is
fsync'd before the rename that publishes it, a damaged newest checkpoint is skipped (with a warning
naming the file and the problem) for the newest intact one, a torn last metrics line is dropped, and
a run killed with SIGKILL -- mid-step or mid-save -- resumes to bit-identical losses and weights."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.train import checkpoint as ckpt_mod
from lmstack.train.checkpoint import (OPTIMIZER, STATE, TRAINABLE, _optimizer_join, _optimizer_split,
                                      checkpoint_problem, list_checkpoints, load_rng, rng_state, save_rng,
                                      set_rng_state)
from lmstack.train.config import load_config
from lmstack.train.loop import train
from lmstack.train.metrics import MetricsError, read_metrics
from tests.train_fixtures import base_cfg, make_model_dir, one_thread, sft_rows, write_jsonl  # noqa: F401

STEPS, STOP = 6, 4  # checkpoints every 2 steps: a stopped run holds step 2 and step 4


def _raw(md, data, out):
    r = base_cfg(md, data, out, max_steps=STEPS, batch_size=2, grad_accum=2, save_every=2, keep_checkpoints=3)
    r["lora"] = {"r": 4, "alpha": 8, "dropout": 0.2}  # dropout: the torch RNG state must come back exactly
    return r


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight run, and a run stopped after step STOP (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("resume")
    md = make_model_dir(tmp)
    data = write_jsonl(tmp / "sft.jsonl", sft_rows(16))
    torch.set_num_threads(1)
    straight = train("sft", load_config(raw=_raw(md, data, tmp / "straight"), stage="sft"))
    stopped = train("sft", load_config(raw=_raw(md, data, tmp / "stopped"), stage="sft"), stop_at_step=STOP)
    assert stopped.interrupted and [c.name for c in list_checkpoints(tmp / "stopped")] == ["step_0000002", "step_0000004"]
    return {"md": md, "data": data, "straight": straight, "stopped": tmp / "stopped"}


def _copy_stopped(runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["stopped"], out)
    return out


def _resume_and_compare(runs, out):
    """Finish the run in `out`; its losses and final weights equal the straight run's exactly."""
    done = train("sft", load_config(raw=_raw(runs["md"], runs["data"], out), stage="sft"))
    assert done.step == STEPS and done.final_dir is not None
    assert _losses(read_metrics(out)) == _losses(runs["straight"].metrics)
    from safetensors.torch import load_file

    a = load_file(str(done.final_dir / "adapter_model.safetensors"))
    b = load_file(str(runs["straight"].final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- formats without pickle
def test_rng_states_round_trip_exactly(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # both cache a second gaussian: part of the state
    st = rng_state()
    save_rng(tmp_path / "rng.safetensors", st)
    want = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(load_rng(tmp_path / "rng.safetensors"))
    got = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert got == want


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        b = torch.nn.Parameter(torch.randn(3))
        return [w, b], torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                                         lr=1e-2, betas=(0.9, 0.95))

    params, opt = make()
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, rest = _optimizer_split(opt.state_dict())
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "rest.json").write_text(json.dumps(rest))
    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(_optimizer_join(load_file(str(tmp_path / "opt.safetensors")),
                                         json.loads((tmp_path / "rest.json").read_text()), opt2))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for ps, o in ((params, opt), (params2, opt2)):  # one more step each: the same update
        sum((x ** 2).sum() for x in ps).backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, params2))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"]) for p, q in zip(params, params2))


def test_a_pickle_in_the_run_directory_is_never_unpickled(runs, tmp_path):
    out = _copy_stopped(runs, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = out / "checkpoints" / "step_0000004"
    # an old-format RNG file beside the new one: never opened
    (newest / "rng_rank0.pt").write_bytes(pickle.dumps(Payload()))
    assert checkpoint_problem(newest) is None
    # the same payload where the safetensors file should be: refused as a bad header, not unpickled
    older = out / "checkpoints" / "step_0000002"
    payload = pickle.dumps(Payload())
    (older / "rng_rank0.safetensors").write_bytes(payload)
    state = json.loads((older / STATE).read_text())
    state["files"]["rng_rank0.safetensors"] = len(payload)
    (older / STATE).write_text(json.dumps(state))
    assert "rng_rank0.safetensors" in checkpoint_problem(older)
    _resume_and_compare(runs, out)
    assert not marker.exists()


def test_no_weights_only_false_or_pickle_loading_in_lmstack():
    root = Path(__file__).resolve().parents[1] / "lmstack"
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for banned in ("weights_only=False", "torch.load(", "pickle.load", "import pickle"):
            assert banned not in text, f"{path}: {banned}"


# ----------------------------------------------------------------------------- damaged checkpoints
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:16] = b"\x00garble!"  # same size, the header is no longer JSON
    p.write_bytes(bytes(data))


DAMAGE = {
    "empty trainer_state": (lambda d: (d / STATE).write_text(""), STATE, "empty file"),
    "torn trainer_state": (lambda d: _truncate(d / STATE), STATE, "invalid JSON"),
    "trainer_state is a list": (lambda d: (d / STATE).write_text("[]"), STATE, "expected a JSON object"),
    "trainer_state step is a string": (
        lambda d: (d / STATE).write_text(json.dumps({**json.loads((d / STATE).read_text()), "step": "4"})),
        STATE, 'step must be an integer, got "4"'),
    "missing trainer_state": (lambda d: (d / STATE).unlink(), STATE, "file is missing"),
    "truncated trainable": (lambda d: _truncate(d / TRAINABLE), TRAINABLE, "truncated or overwritten"),
    "empty trainable": (lambda d: (d / TRAINABLE).write_bytes(b""), TRAINABLE, "truncated or overwritten"),
    "garbled trainable header": (lambda d: _garble_header(d / TRAINABLE), TRAINABLE, "corrupt safetensors header"),
    "truncated optimizer": (lambda d: _truncate(d / OPTIMIZER), OPTIMIZER, "truncated or overwritten"),
    "missing rng": (lambda d: (d / "rng_rank0.safetensors").unlink(), "rng_rank0.safetensors", "file is missing"),
    "old pickle format": (
        lambda d: (d / STATE).write_text(json.dumps({k: v for k, v in json.loads((d / STATE).read_text()).items()
                                                     if k != "format"})),
        STATE, "older lmstack"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(runs, tmp_path, caplog, damage):
    out = _copy_stopped(runs, tmp_path)
    newest = out / "checkpoints" / "step_0000004"
    do, file, problem = DAMAGE[damage]
    do(newest)
    with caplog.at_level(logging.INFO, logger="lmstack"):
        _resume_and_compare(runs, out)  # from step 2: the same losses, bit for bit
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(newest / file) in skipped[0] and problem in skipped[0], skipped
    assert any("resumed from" in r.getMessage() and "step_0000002" in r.getMessage() for r in caplog.records)
    assert checkpoint_problem(newest) is None  # rewritten when the run reached step 4 again


def test_no_intact_checkpoint_is_an_error_naming_each_problem(runs, tmp_path):
    out = _copy_stopped(runs, tmp_path)
    for d in list_checkpoints(out):
        (d / STATE).write_text("")
    with pytest.raises(ConfigError, match="no intact checkpoint") as e:
        train("sft", load_config(raw=_raw(runs["md"], runs["data"], out), stage="sft"))
    assert all(str(d / STATE) in str(e.value) for d in list_checkpoints(out))


def test_rotation_keeps_intact_checkpoints_below_a_damaged_later_one(runs, tmp_path):
    out = _copy_stopped(runs, tmp_path)
    (out / "checkpoints" / "step_0000004" / TRAINABLE).write_bytes(b"")
    raw = _raw(runs["md"], runs["data"], out)
    raw["training"]["keep_checkpoints"] = 1
    train("sft", load_config(raw=raw, stage="sft"), stop_at_step=3)  # from step 2, saves step 3
    # keep=1 keeps step 3; the damaged step 4 did not count as "newer" and push it out
    assert [c.name for c in list_checkpoints(out)] == ["step_0000003", "step_0000004"]
    assert checkpoint_problem(out / "checkpoints" / "step_0000003") is None


# ----------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_and_named(runs, tmp_path, caplog):
    out = _copy_stopped(runs, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2, "note": "unterminated')  # a crash mid-append
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        assert len(read_metrics(out)) == STOP
    assert any(str(out / "metrics.jsonl") in r.getMessage() and "line 5" in r.getMessage() for r in caplog.records)
    _resume_and_compare(runs, out)
    (out / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes() + b"\x00" * 64)  # zero-filled tail
    assert len(read_metrics(out)) == len(runs["straight"].metrics)


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(MetricsError, match=re.escape(f"{tmp_path / 'metrics.jsonl'}: line 2 is not a metrics row")):
        read_metrics(tmp_path)


# ----------------------------------------------------------------------------- durability
def test_every_checkpoint_file_is_fsynced_before_the_rename(runs, tmp_path, monkeypatch):
    synced: list[str] = []
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", synced[-1]))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        return real_replace(src, dst)

    tmp_path = Path(os.path.realpath(tmp_path))

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    out = _copy_stopped(runs, tmp_path)
    train("sft", load_config(raw=_raw(runs["md"], runs["data"], out), stage="sft"))
    for step in ("step_0000006",):
        final = out / "checkpoints" / step
        tmp = out / "checkpoints" / f".tmp_{step}"
        at = events.index(("replace", str(final)))
        before = {p for kind, p in events[:at] if kind == "fsync"}
        for f in final.iterdir():
            assert str(tmp / f.name) in before, f"{f.name} was not fsync'd before the rename"
        assert str(tmp) in before  # the directory's entries
        assert ("fsync", str(final.parent)) in events[at:]  # and the rename itself
    assert ("replace", str(out / "final")) in events and str(out / ".tmp_final" / "adapter_model.safetensors") in synced
    assert str(out / "metrics.jsonl") in synced and ("replace", str(out / "config.yaml")) in events


# ----------------------------------------------------------------------------- kill -9
_CHILD = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from lmstack.train.algos.sft import SFT
from lmstack.train.config import load_config
from lmstack.train.loop import train
from lmstack.tokenizer import Tokenizer
import lmstack.train.checkpoint as ck
import json
raw, where, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = load_config(raw=raw, stage="sft")

class Killed(SFT):
    calls = 0
    def loss(self, model, batch):
        Killed.calls += 1
        if where == "step" and Killed.calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(model, batch)

if where == "save":  # die inside the n-th checkpoint save, its files written but not yet renamed in
    real, seen = ck.commit_dir, [0]
    def commit(tmp, final):
        seen[0] += 1
        if seen[0] == n:
            ck.fsync_tree(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        real(tmp, final)
    ck.commit_dir = commit
train(Killed(cfg, Tokenizer.from_dir(cfg.model.tokenizer_dir)), cfg)
"""


@pytest.mark.parametrize("where,n,resumes_from", [("step", 10, "step_0000004"), ("save", 2, "step_0000002")],
                         ids=["mid-step-5", "mid-save-of-step-4"])
def test_kill_9_resumes_bit_identically(runs, tmp_path, caplog, where, n, resumes_from):
    out = tmp_path / "killed"
    raw = _raw(runs["md"], runs["data"], out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(raw), where, str(n)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if where == "save":
        assert (out / "checkpoints" / ".tmp_step_0000004").is_dir()  # the save that was cut off (cleared later)
    with caplog.at_level(logging.INFO, logger="lmstack"):
        _resume_and_compare(runs, out)
    assert any("resumed from" in r.getMessage() and resumes_from in r.getMessage() for r in caplog.records)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
