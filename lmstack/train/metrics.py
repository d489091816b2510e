"""metrics.jsonl: one JSON row per logged step (written as training goes), read back, plotted."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.log import logger
from lmstack.train.checkpoint import atomic_write_text, fsync_path

METRICS = "metrics.jsonl"


class MetricsError(ValueError):
    """metrics.jsonl holds a line that is not a metrics row; the message names the file and line."""


def _parse_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl. A bad LAST line is what a crash or power loss mid-append leaves (cut
    short, or zero-filled): it is dropped with a warning. A bad line before it is an error naming it."""
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip(b" \t\r\x00")), default=-1)
    rows = []
    for i, line in enumerate(lines[: last + 1]):
        try:
            row = json.loads(line.decode("utf-8")) if line.strip() else None
            if row is not None and not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == last:
                logger.warning("%s: line %d is cut short (%s); dropping it", path, i + 1, e)
                break
            raise MetricsError(f"{path}: line {i + 1} is not a metrics row ({e})") from None
        if row is not None:
            rows.append(row)
    return rows


class MetricsWriter:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and path.is_file():
            # On resume, drop rows logged after the checkpoint (they will be recomputed); a new run starts empty.
            if resume_step is not None:
                self.rows = [r for r in _parse_rows(path) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def sync(self) -> None:
        """fsync the rows so far: called with each checkpoint, so they are on disk when it is."""
        if self.enabled and self.path.is_file():
            fsync_path(self.path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no metrics (is {run_dir} a training run directory?)")
    return _parse_rows(p)


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
