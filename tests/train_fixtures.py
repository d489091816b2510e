"""Shared helpers for the training tests: a tiny chat tokenizer + tiny HF model + small datasets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer

QA = [("What is 2 + 3?", "2 + 3 = 5."), ("Say hello.", "Hello world!"), ("Name a color.", "Blue."),
      ("What is 12 * 34?", "12 * 34 = 408."), ("Translate cat.", "猫"), ("Count to three.", "1 2 3"),
      ("Is the sky blue?", "Yes, today."), ("Add 7 and 5.", "7 + 5 = 12.")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        if i % 2:
            rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]})
        else:
            rows.append({"system": "Be brief.", "instruction": q, "output": a})
    return rows


def make_model_dir(tmp: Path, style: str = "chatml", family: str = "llama", seed: int = 0) -> Path:
    """A tiny random HF model (vocab 320) with a `style` chat tokenizer copied in."""
    d = tmp / f"base_{family}_{style}"
    if not (d / "config.json").is_file():
        tok_dir = build_test_tokenizer(tmp / f"tok_{style}", style)
        make_tiny_hf(family, d, seed=seed)
        for f in Path(tok_dir).iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    return d


def base_cfg(model_dir: Path, data: Path, out: Path, **training) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data)], "max_len": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "training": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "seed": 0, "out_dir": str(out),
                     "device": "cpu", **training},
    }


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine
    (tens of times faster there); restored afterwards so other tests are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
