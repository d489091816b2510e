"""metrics.jsonl: one JSON row per logged step (written as training goes), read back, plotted."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.log import logger

METRICS = "metrics.jsonl"


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
