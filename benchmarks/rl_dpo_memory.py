"""DPO peak memory: reference log-probs computed live by a frozen copy vs precomputed once.

A random-weight model with SmolLM2-135M's shape (../shared/bench_models/smollm2-135m/config.json)
runs a few DPO optimizer steps (lmstack's DPO stage, AdamW) on synthetic token pairs, once with
`algo.precompute_ref: false` (a frozen reference copy stays in memory and runs every step) and once
with `precompute_ref: true` (one pass of the reference over the data before training, then it is
freed). Each case runs in its own process; peak memory covers setup and training: CUDA
max_memory_allocated on GPU, on CPU the process RSS high-water mark (VmHWM) above the RSS before
the model was built.

  python benchmarks/rl_dpo_memory.py            # 16 pairs, prompt 128 + answers 128, batch 4, 3 steps
  python benchmarks/rl_dpo_memory.py --quick    # 8 pairs, prompt 32 + answers 32, batch 2, 2 steps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from train import cuda_available  # noqa: E402  (benchmarks/train.py)

DEFAULT_CONFIG = ROOT.parent / "shared" / "bench_models" / "smollm2-135m" / "config.json"


def make_model(config_json: Path, out: Path) -> None:
    import torch

    from lmstack.config import ModelConfig
    from lmstack.model.loading import save_model
    from lmstack.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(json.loads(config_json.read_text()), str(config_json))
    model = Transformer(cfg)
    model.init_weights()
    save_model(model, out)


class _Tok:
    """The DPO stage only needs pad / eos ids here (the pairs are token ids already)."""

    pad_token_id = 0
    eos_token_ids = [0]


def run_case(a: argparse.Namespace, precompute: bool) -> dict:
    import random

    import torch

    from train import PeakMemory  # benchmarks/train.py: RSS high-water mark / CUDA peak

    from lmstack.model.loading import load_model
    from lmstack.train.algos._pref import PrefExample
    from lmstack.train.algos.dpo import DPO
    from lmstack.train.config import load_config

    dev = torch.device(a.device)
    mem = PeakMemory(a.device)
    mem.start()
    raw = {"model": {"path": a.model_dir}, "data": {"train": ["synthetic"], "max_len": 4096},
           "training": {"batch_size": a.batch, "device": a.device},
           "algo": {"beta": 0.1, "precompute_ref": precompute}}
    cfg = load_config(raw=raw, stage="dpo")
    stage = DPO(cfg, _Tok())
    rng = random.Random(0)
    V = 49152

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, V) for _ in range(n)]

    data = [PrefExample(ids(a.prompt), ids(a.answer), ids(a.answer)) for _ in range(a.pairs)]
    stage._datasets = [data]
    model = load_model(a.model_dir, dtype=torch.float32, device=dev)
    t0 = time.perf_counter()
    stage.setup(model, dev)
    setup_s = time.perf_counter() - t0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    t0 = time.perf_counter()
    for s in range(a.steps):
        batch = stage.collate(data[(s * a.batch) % a.pairs:][: a.batch])
        batch = {k: v.to(dev) for k, v in batch.items()}
        out = stage.loss(model, batch)
        (out.total / out.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if a.device == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / a.steps
    return {"peak_mb": mem.stop(), "setup_s": setup_s, "step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--case", choices=["live", "precompute"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.prompt, a.answer, a.batch, a.steps = 8, 32, 32, 2, 2
    if a.case:  # child: one case, one JSON line
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(run_case(a, a.case == "precompute")), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(a.config, model_dir)
        for case in ("live", "precompute"):
            cmd = [sys.executable, __file__, "--case", case, "--model-dir", str(model_dir), "--pairs", str(a.pairs),
                   "--prompt", str(a.prompt), "--answer", str(a.answer), "--batch", str(a.batch),
                   "--steps", str(a.steps), "--threads", str(a.threads), "--device", a.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[case] = json.loads(line[7:])
    mem = "CUDA max allocated" if a.device == "cuda" else "peak RSS above the pre-model baseline"
    print(f"\nDPO on a random SmolLM2-135M-shape model ({a.device}): {a.pairs} pairs, prompt {a.prompt} + answers "
          f"{a.answer} tokens, batch {a.batch} pairs, {a.steps} steps, fp32 + AdamW; memory = {mem}\n")
    print("| reference log-probs | peak MiB | setup s | s / step |")
    print("|---|---|---|---|")
    for case, label in (("live", "live (frozen copy)"), ("precompute", "precomputed once")):
        r = results.get(case)
        if r:
            print(f"| {label} | {r['peak_mb']:.0f} | {r['setup_s']:.1f} | {r['step_s']:.2f} |")
    if len(results) == 2:
        print(f"\nprecomputed / live peak memory: {results['precompute']['peak_mb'] / results['live']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
