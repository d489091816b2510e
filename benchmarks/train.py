"""SFT training throughput and peak memory: lmstack (full / LoRA / QLoRA) vs HF Trainer (+ PEFT).

A random-weight model with SmolLM2-135M's shape (../shared/bench_models/smollm2-135m/config.json)
trains on the same synthetic SFT batches (fixed-length sequences, loss on the second half of each:
the "answer") in both frameworks, at the same sequence length, batch size and precision. Each case
runs in its own process; peak memory is measured over the training steps (weights + gradients +
optimizer state + activations): CUDA max_memory_allocated on GPU, on CPU the kernel's RSS
high-water mark (VmHWM) minus the RSS before the model was built. The first step is warm-up, not timed.

  python benchmarks/train.py            # seq 512, batch 8, 6 steps
  python benchmarks/train.py --quick    # seq 128, batch 2, 3 steps (a few minutes on 2 CPU cores)

HF has no CPU QLoRA (bitsandbytes NF4 needs CUDA), so QLoRA is compared with lmstack's LoRA. On a
CPU without native bf16 (no AVX512-BF16 / AMX) bf16 matmuls, and so QLoRA (which computes in
bf16), are emulated and very slow; compare their memory on short sequences there, e.g.
  python benchmarks/train.py --seq 32 --batch 1 --steps 1 --precision bf16 --cases lmstack:lora,lmstack:qlora
QLoRA vs LoRA memory, where weights rather than activations dominate (few tokens per step,
gradient checkpointing), on this shape and on Qwen2.5-0.5B's:
  python benchmarks/train.py --quick --grad-ckpt --cases lmstack:lora,lmstack:qlora,lmstack:qlora-emb
  python benchmarks/train.py --quick --grad-ckpt --cases lmstack:lora,lmstack:qlora,lmstack:qlora-emb \\
      --config ../shared/bench_models/qwen2.5-0.5b/config.json
Targets (issue 5): lmstack >= 1.3x HF tokens/s at no more peak memory; QLoRA peak <= 0.5x LoRA's.
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
DEFAULT_CONFIG = ROOT.parent / "shared" / "bench_models" / "smollm2-135m" / "config.json"
LORA = dict(r=16, alpha=32, dropout=0.0)


def make_model(config_json: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{k: v for k, v in json.loads(config_json.read_text()).items() if k != "architectures"})
    cfg.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.save_pretrained(out)


def synthetic(n: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(token ids, prompt length): the loss covers the tokens after the prompt."""
    import random

    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(seq)], seq // 2) for _ in range(n)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class PeakMemory:
    """Peak memory while training: CUDA max_memory_allocated, or on CPU the kernel's RSS high-water mark
    (VmHWM, reset at start by writing 5 to /proc/self/clear_refs) minus the RSS before the model existed.
    Exact and free: an earlier version polled RSS from a thread every millisecond, which missed short
    peaks and stole CPU (and the GIL) from the 2-core training being timed. Falls back to that polling
    where clear_refs is not writable."""

    def __init__(self, device: str) -> None:
        self.device, self.base, self.peak, self._stop, self._t = device, _rss_mb(), 0.0, False, None

    def start(self) -> None:
        import threading

        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        except OSError:
            pass

        def poll() -> None:
            while not self._stop:
                self.peak = max(self.peak, _rss_mb())
                time.sleep(0.001)

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()

    def stop(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        if self._t is None:
            return _hwm_mb() - self.base
        self._stop = True
        self._t.join()
        return max(self.peak, _rss_mb()) - self.base


def run_lmstack(a: argparse.Namespace, mode: str) -> dict:
    import torch

    from lmstack.train.algos.sft import SFT
    from lmstack.train.config import load_config
    from lmstack.train.data import Example, ResumableSampler
    from lmstack.train.distributed import DistInfo
    from lmstack.train.loop import _autocast, _prepare_model, _Run, _to_device, build_model

    mem = PeakMemory(a.device)
    dev = torch.device(a.device)
    raw = {"model": {"path": a.model_dir}, "data": {"train": ["(synthetic)"], "max_len": a.seq},
           "optim": {"lr": 1e-4}, "training": {"batch_size": a.batch, "precision": a.precision, "device": a.device,
                                              "gradient_checkpointing": a.grad_ckpt}}
    if mode != "full":
        raw["lora"] = {**LORA, "target_modules": "all-linear", "qlora": mode.startswith("qlora"),
                       "quantize_embeddings": mode == "qlora-emb"}
    cfg = load_config(raw=raw, stage="sft")
    lora_bf16 = cfg.lora is not None and (cfg.lora.qlora or a.precision == "bf16")
    model = build_model(cfg, None, dev, torch.bfloat16 if lora_bf16 else torch.float32)
    _prepare_model(cfg, model)
    model.train()

    class _Tok:  # the stage only needs the pad id
        pad_token_id, eos_token_ids = 0, [0]

    stage = SFT(cfg, _Tok())
    data = [Example(ids, [False] * p + [True] * (len(ids) - p)) for ids, p in synthetic(a.batch * (a.steps + 1), a.seq, 49152)]
    run = _Run(cfg, stage, model, [], ResumableSampler(len(data)), DistInfo(device=dev))
    run.max_steps = a.steps + 1
    times = []
    mem.start()
    for s in range(a.steps + 1):
        mb = _to_device(stage.collate(data[s * a.batch:(s + 1) * a.batch]), dev)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, *_ = run.optimizer_step([mb], _autocast(cfg, dev))
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = mem.stop()
    step = sum(times[1:]) / len(times[1:])
    res = {"tok_s": a.batch * a.seq / step, "step_s": step, "peak_mb": peak, "loss": loss}
    if a.device == "cpu":  # one more (untimed) step, its tensor allocations traced
        alive = [t for t in model.state_dict(keep_vars=True).values()] + [p.grad for p in run.params if p.grad is not None]
        alive += [v for st in run.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        mb = _to_device(stage.collate(data[:a.batch]), dev)
        res["tensor_peak_mb"] = tensor_peak_mb(lambda: run.optimizer_step([mb], _autocast(cfg, dev)), alive)
    return res


def tensor_peak_mb(step, alive: list) -> float:
    """Peak bytes of live tensors during `step()` (MiB): the tensors in `alive` (weights, gradients,
    optimizer state) plus the running sum of the allocations and frees the profiler records - on CPU,
    what torch.cuda.max_memory_allocated reports on a GPU. Unlike RSS it leaves out the runtime's own
    memory (code, JIT-compiled kernels, thread stacks, allocator slack), 170-1,500 MiB here, growing with the step."""
    from torch.profiler import ProfilerActivity, profile

    base = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:  # the profiler's raw allocation records (a semi-private API; torch 2.5-2.13 have it)
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError as e:
        print(f"peak tensor bytes unavailable in this torch ({e})", file=sys.stderr)
        return float("nan")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return (base + peak) / 2**20


def run_hf(a: argparse.Namespace, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    mem = PeakMemory(a.device)
    # As in run_lmstack: LoRA under bf16 keeps the frozen base in bf16 (what PEFT users load); full
    # fine-tuning keeps fp32 master weights under bf16 autocast.
    base_dtype = torch.bfloat16 if mode == "lora" and a.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=base_dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = []
    for ids, p in synthetic(a.batch * (a.steps + 1), a.seq, 49152):
        rows.append({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                     "labels": torch.tensor([-100] * p + ids[p:])})

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=a.batch, max_steps=a.steps + 1,
                                 learning_rate=1e-4, bf16=a.precision == "bf16", use_cpu=a.device == "cpu",
                                 report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 gradient_checkpointing=a.grad_ckpt, dataloader_num_workers=0, max_grad_norm=1.0,
                                 seed=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Timer()])
        mem.start()
        trainer.train()
        peak = mem.stop()
    step = sum(times[1:]) / len(times[1:])
    return {"tok_s": a.batch * a.seq / step, "step_s": step, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--quick", action="store_true", help="seq 128, batch 2, 3 timed steps")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    ap.add_argument("--precision", default=None,
                    help="fp32 | bf16 (default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both frameworks")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--cases", default="lmstack:full,hf:full,lmstack:lora,hf:lora,lmstack:qlora,lmstack:qlora-emb")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.seq, a.batch, a.steps = 128, 2, 3
    if a.precision is None:
        import torch

        from lmstack.precision import auto_dtype

        a.precision = "bf16" if a.device == "cuda" or auto_dtype() == torch.bfloat16 else "fp32"

    if a.case:  # child process: one case, one JSON line
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        fw, mode = a.case.split(":")
        res = (run_lmstack if fw == "lmstack" else run_hf)(a, mode)
        print("RESULT " + json.dumps(res), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(a.config, model_dir)
        results = {}
        for case in a.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--model-dir", str(model_dir), "--seq", str(a.seq),
                   "--batch", str(a.batch), "--steps", str(a.steps), "--device", a.device, "--precision", a.precision, "--threads", str(a.threads)]
            if a.grad_ckpt:
                cmd.append("--grad-ckpt")
            # glibc's default malloc settings in both: what users get. (An earlier version fixed the mmap
            # threshold so RSS tracked live memory; that page-faulted every large temporary and made
            # both frameworks ~1.8x slower, elementwise-heavy code most.)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[case] = json.loads(line[7:])
            print(f"  {case:14s} {results[case]['tok_s']:9.1f} tok/s  peak {results[case]['peak_mb']:8.0f} MiB",
                  file=sys.stderr, flush=True)

    mem = "CUDA max allocated" if a.device == "cuda" else "peak RSS while training, above the pre-model baseline"
    print(f"\nSFT on a random SmolLM2-135M-shape model: seq {a.seq}, batch {a.batch}, {a.precision}, {a.device}"
          f"{f', {a.threads} thread(s)' if a.threads else ''}"
          f"{', gradient checkpointing' if a.grad_ckpt else ''}; {a.steps} timed steps; memory = {mem}\n")
    print(f"| {'mode':6s} | {'lmstack tok/s':>13s} | {'HF tok/s':>9s} | {'speed-up':>8s} | {'lmstack MiB':>11s} | {'HF MiB':>7s} | {'mem ratio':>9s} |")
    print("|--------|---------------|-----------|----------|-------------|---------|-----------|")
    for mode in ("full", "lora", "qlora", "qlora-emb"):
        ours, theirs = results.get(f"lmstack:{mode}"), results.get(f"hf:{mode}")
        if not ours:
            continue
        sp = f"{ours['tok_s'] / theirs['tok_s']:.2f}x" if theirs else "n/a"
        mr = f"{ours['peak_mb'] / theirs['peak_mb']:.2f}" if theirs else "n/a"
        print(f"| {mode:6s} | {ours['tok_s']:13.1f} | {theirs['tok_s'] if theirs else float('nan'):9.1f} | {sp:>8s} | "
              f"{ours['peak_mb']:11.0f} | {theirs['peak_mb'] if theirs else float('nan'):7.0f} | {mr:>9s} |")
    lora = results.get("lmstack:lora")
    if lora and any(f"lmstack:{m}" in results for m in ("qlora", "qlora-emb")):
        # QLoRA's target is against lmstack's own LoRA (HF has no CPU QLoRA): peak RSS, and peak tensor
        # bytes (the GPU's max_memory_allocated; RSS adds the same runtime memory to both)
        tensor = "tensor_peak_mb" in lora
        print("\nQLoRA vs LoRA peak memory (qlora: NF4 linears, as in the paper; qlora-emb: lora.quantize_embeddings, "
              "the embedding / LM head NF4 too). Target <= 0.5\n")
        print("| mode | peak RSS MiB | / LoRA |" + (" peak tensor MiB | / LoRA |" if tensor else ""))
        print("|---|---|---|" + ("---|---|" if tensor else ""))
        for mode in ("lora", "qlora", "qlora-emb"):
            r = results.get(f"lmstack:{mode}")
            if r:
                row = f"| {mode} | {r['peak_mb']:.0f} | {r['peak_mb'] / lora['peak_mb']:.2f} |"
                if tensor:
                    row += f" {r['tensor_peak_mb']:.0f} | {r['tensor_peak_mb'] / lora['tensor_peak_mb']:.2f} |"
                print(row)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
