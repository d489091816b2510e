"""lmstack's C++ CPU kernels against the PyTorch ops they replace, at the engine's real sizes.

Each row times one call both ways in the same run (median of repeated calls) and prints the ratio:
  - decode attention, one layer: the PyTorch path (gather every sequence's blocks into a padded copy,
    one masked SDPA) vs the PagedAttention kernel reading K/V in place through the block tables;
    64 sequences at SmolLM2-135M's heads (a GRPO rollout) and at Qwen2.5-0.5B's (the throughput run);
  - residual add + RMSNorm, silu(gate) * up, RoPE on q and k: a decode step's 64 rows and a 2,048-token
    prefill chunk at Qwen2.5-0.5B's sizes;
  - sampling at temperature 1 from (64, V) logits: the old full softmax + float64 cumsum vs the
    sampler's two-level CDF;
  - a whole engine decode step (1 and 32 sequences, SmolLM2-135M shape, all 30 layers, random
    weights): the eager forward through PagedMeta vs every layer in one C++ call (csrc/decode_layers.cpp),
    same runner, same inputs.

    python benchmarks/cpu_kernels.py [--dtype bfloat16|float32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._engine_common import random_model  # noqa: E402
from lmstack import cpu_kernels  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.engine.llm import LLM  # noqa: E402
from lmstack.engine.model_runner import PagedMeta  # noqa: E402
from lmstack.engine.sampler import SampleRow, Sampler  # noqa: E402
from lmstack.engine.sampling_params import SamplingParams  # noqa: E402
from lmstack.malloc import keep_freed_memory  # noqa: E402
from lmstack.model.rope import apply_rope  # noqa: E402


def timed(fn, reps: int = 30) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_case(dt: torch.dtype, S: int, H: int, Hkv: int, D: int, lens: tuple[int, int], bs: int = 16):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(lens[0], lens[1] + 1, (S,), generator=g)
    nblk = -(-int(ctx.max()) // bs)
    NB = S * nblk + 8
    k_pool = torch.randn(NB, bs, Hkv, D, generator=g).to(dt)
    v_pool = torch.randn(NB, bs, Hkv, D, generator=g).to(dt)
    tables = torch.randperm(NB, generator=g)[:S * nblk].view(S, nblk)
    q = torch.randn(S, H, D, generator=g).to(dt)

    def pytorch():  # what PagedMeta does without the kernel, for one length group
        L = nblk * bs
        mask = torch.zeros(S, L, dtype=dt).masked_fill_(torch.arange(L)[None] >= ctx[:, None], float("-inf"))
        kd = PagedMeta.gather(k_pool, tables).transpose(1, 2)  # (S, Hkv, L, D)
        vd = PagedMeta.gather(v_pool, tables).transpose(1, 2)
        return F.scaled_dot_product_attention(q.view(S, Hkv, H // Hkv, D), kd, vd, attn_mask=mask[:, None, None])

    def kernel():
        return cpu_kernels.paged_decode_attention(q, k_pool, v_pool, tables, ctx, D ** -0.5, None)

    return pytorch, kernel


SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "bench_models" / "smollm2-135m"


def decode_step_case(dt: torch.dtype, rows: int):
    """One decode step of `rows` sequences (100-token prompts): the runner's eager forward and its C++ loop."""
    model = random_model(ModelConfig.from_hf(SMOLLM2), dt)
    llm = LLM.from_model(model)
    runner = llm.runner
    execute, cpp = runner.execute, runner.cpp_decode
    steps: list[tuple] = []

    def capture(*args):
        steps.append(args)
        return execute(*args)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 49152, (100,), generator=g).tolist() for _ in range(rows)]
    runner.execute = capture
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    runner.execute = execute
    args = steps[-1]  # the last step: every sequence decoding
    assert all(len(t) == 1 for t in args[0]) and cpp is not None and cpp.plan() is not None

    def eager():
        runner.cpp_decode = None
        try:
            return execute(*args)
        finally:
            runner.cpp_decode = cpp

    return eager, lambda: execute(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    keep_freed_memory()  # as the engine does
    if cpu_kernels.load() is None:
        raise SystemExit("the C++ kernels could not be built here (see the warning above)")
    rows: list[tuple[str, float, float]] = []
    with torch.no_grad():
        for name, shape in [("decode attention, 64 seqs, SmolLM2 heads 9/3, ctx 64-192", (64, 9, 3, 64, (64, 192))),
                            ("decode attention, 64 seqs, Qwen2.5 heads 14/2, ctx 100-700", (64, 14, 2, 64, (100, 700)))]:
            S, H, Hkv, D, lens = shape
            p, k = attention_case(dt, S, H, Hkv, D, lens)
            rows.append((name, timed(p), timed(k)))
        for R in (64, 2048):
            x, y = torch.randn(R, 896).to(dt), torch.randn(R, 896).to(dt)
            w = torch.randn(896).to(dt)

            def eager_add_norm():
                s = x + y
                h = s.float()
                return s, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)

            rows.append((f"residual add + RMSNorm, {R} x 896", timed(eager_add_norm),
                         timed(lambda: cpu_kernels.add_rms_norm(x, y, w, 1e-6))))
            gu = torch.randn(R, 2 * 4864).to(dt)
            gate, up = gu.split(4864, -1)
            rows.append((f"silu(gate) * up, {R} x 4864", timed(lambda: F.silu(gate) * up),
                         timed(lambda: cpu_kernels.silu_mul(gu))))
            qkv = torch.randn(1, R, (14 + 2 * 2) * 64).to(dt)
            ang = torch.randn(1, R, 32)
            cos, sin = torch.cat([ang, ang], -1).cos().to(dt), torch.cat([ang, ang], -1).sin().to(dt)
            q, kk, _ = qkv.split([14 * 64, 2 * 64, 2 * 64], -1)
            rows.append((f"RoPE on q and k, {R} tokens, heads 14/2", timed(lambda: (
                apply_rope(q.view(1, R, 14, 64), cos, sin), apply_rope(kk.view(1, R, 2, 64), cos, sin))),
                timed(lambda: cpu_kernels.rope_(qkv, cos, sin, 16, 64))))
        for V in (49152, 151936):
            logits = 3 * torch.randn(64, V)
            gens = [torch.Generator().manual_seed(i) for i in range(64)]

            def old():  # the sampler before the two-level CDF: full softmax, float64 cumsum
                probs = (logits / 1.0).softmax(-1)
                cdf = probs.double().cumsum(-1)
                u = torch.stack([1.0 - torch.rand((), generator=g_, dtype=torch.float64) for g_ in gens])
                return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])

            sample_rows = [SampleRow(SamplingParams(temperature=1.0), g_) for g_ in gens]
            rows.append((f"sampling at T=1, 64 x {V}", timed(old), timed(lambda: Sampler()(logits, sample_rows))))
        if SMOLLM2.is_dir():
            for R in (1, 32):
                e, c = decode_step_case(dt, R)
                rows.append((f"decode step, {R} seq(s), SmolLM2-135M shape, 30 layers", timed(e, 20), timed(c, 20)))

    print(f"lmstack C++ CPU kernels vs the PyTorch ops (or the eager forward) they replace ({a.dtype}, {torch.get_num_threads()} threads; "
          "median per call)\n")
    w0 = max(len(r[0]) for r in rows)
    print(f"| {'operation':{w0}s} | PyTorch / eager (ms) | lmstack C++ (ms) | speed-up |")
    print(f"|{'-' * (w0 + 2)}|----------------------|------------------|----------|")
    for name, t_ref, t_new in rows:
        print(f"| {name:{w0}s} | {t_ref * 1e3:20.3f} | {t_new * 1e3:16.3f} | {t_ref / t_new:7.2f}x |")


if __name__ == "__main__":
    main()
