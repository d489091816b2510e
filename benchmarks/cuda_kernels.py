"""lmstack's Triton kernels (lmstack/kernels/cuda) against the PyTorch paths they replace, on one CUDA GPU.

Shapes are Qwen2.5-0.5B's (14 query heads, 2 KV heads, head_dim 64, hidden 896, intermediate 4864,
vocabulary 151936) with the engine's 16-token KV blocks. Each row times both sides in the same run
(CUDA events, median of repeated calls, L2 flushed before each call so weights and K/V come from
HBM as they do in a real step) and checks the Triton result against the reference (max |diff|):
  - decode attention, one layer: 64 sequences of 512 context (and 8 of 4096, where flash-decoding's
    split-K matters): the engine's fallback today (gather every sequence's blocks into a padded copy,
    one masked SDPA) vs the paged kernel reading K/V in place, with and without split-K;
  - prefill attention: 8 fresh 512-token prompts, and 8 chunks of 512 new tokens after a 1,536-token
    cached prefix: one SDPA call per sequence over its gathered context (the engine today) vs one
    varlen launch;
  - residual add + RMSNorm, silu(gate) * up, RoPE on a fused qkv row: 64 rows (decode) and 4,096 (prefill);
  - weight-only int8 / AWQ int4 / NF4 products at M = 1, 16, 256 rows: dequantize + F.linear (the
    fallback) vs the fused dequant-GEMM, next to the dense bf16 F.linear (cuBLAS) a bf16 model pays,
    and torch's own int4 tinygemm CUDA kernel where this PyTorch build has it;
  - sampling 64 x 151936 bf16 logits: the engine's sampler (per-row torch.Generator uniforms) and the
    PyTorch Gumbel reference vs the Triton sampler.

    python benchmarks/cuda_kernels.py [--reps 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmstack.engine.sampler import SampleRow, Sampler  # noqa: E402
from lmstack.engine.sampling_params import SamplingParams  # noqa: E402
from lmstack.kernels.cuda import decode_attention as dec  # noqa: E402
from lmstack.kernels.cuda import elementwise as ew  # noqa: E402
from lmstack.kernels.cuda import prefill_attention as pre  # noqa: E402
from lmstack.kernels.cuda import quant_gemm as qg  # noqa: E402
from lmstack.kernels.cuda import sampler as smp  # noqa: E402
from lmstack.model import quant  # noqa: E402

H, HKV, D, HIDDEN, INTER, VOCAB, PAGE = 14, 2, 64, 896, 4864, 151936, 16
DT = torch.bfloat16
_FLUSH: torch.Tensor | None = None


def cuda_us(fn, reps: int) -> float:
    """Median microseconds per call (CUDA events), after warm-up (which also compiles the kernel)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")  # > the H200's 60 MB L2
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def pools(lens: list[int], g: torch.Generator):
    need = [-(-L // PAGE) for L in lens]
    nb = sum(need) + 8
    k = torch.randn(nb, PAGE, HKV, D, generator=g).to("cuda", DT)
    v = torch.randn(nb, PAGE, HKV, D, generator=g).to("cuda", DT)
    tables = torch.randperm(nb, generator=g)[: len(lens) * max(need)].view(len(lens), max(need)).int().cuda()
    return k, v, tables


def decode_rows(S: int, L: int, reps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    k, v, tables = pools([L] * S, g)
    q = torch.randn(S, H, D, generator=g).to("cuda", DT)
    ctx = torch.full((S,), L, dtype=torch.int32, device="cuda")
    G, T = H // HKV, tables.shape[1] * PAGE
    mask = torch.zeros(S, 1, 1, T, dtype=DT, device="cuda").masked_fill_(
        torch.arange(T, device="cuda")[None, None, None] >= ctx[:, None, None, None], float("-inf"))

    def sdpa():  # engine/model_runner.py _decode_sdpa: gather whole blocks, one masked SDPA
        kd = k[tables.long()].flatten(1, 2).transpose(1, 2)  # (S, Hkv, T, D)
        vd = v[tables.long()].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q.view(S, HKV, G, D), kd, vd, attn_mask=mask).reshape(S, H, D)

    ref = sdpa()
    name = f"decode attention, {S} seqs x {L} ctx"
    splits = dec.default_splits(q, HKV, L, 64)
    auto = lambda: dec.paged_decode_attention(q, k, v, tables, ctx, D ** -0.5)  # noqa: E731
    one = lambda: dec.paged_decode_attention(q, k, v, tables, ctx, D ** -0.5, num_splits=1)  # noqa: E731
    t_ref = cuda_us(sdpa, reps)
    return [(f"{name} (split-K {splits})", "gather + SDPA", t_ref, cuda_us(auto, reps), diff(auto(), ref)),
            (f"{name} (1 split)", "gather + SDPA", t_ref, cuda_us(one, reps), diff(one(), ref))]


def prefill_row(S: int, prefix: int, new: int, reps: int) -> tuple:
    g = torch.Generator().manual_seed(1)
    lens = [prefix + new] * S
    k, v, tables = pools(lens, g)
    q = torch.randn(S * new, H, D, generator=g).to("cuda", DT)
    cu = torch.arange(0, S * new + 1, new, dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    args = (q, k, v, tables, cu, seq_lens, D ** -0.5)
    ref = lambda: pre.varlen_prefill_attention_ref(*args)  # noqa: E731
    new_ = lambda: pre.varlen_prefill_attention(*args, max_seqlen_q=new)  # noqa: E731
    return (f"prefill attention, {S} x ({prefix} cached + {new} new)", "SDPA per sequence",
            cuda_us(ref, reps), cuda_us(new_, reps), diff(new_(), ref()))


def elementwise_rows(R: int, reps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(R, HIDDEN, generator=g).to("cuda", DT) for _ in range(2))
    w = torch.randn(HIDDEN, generator=g).to("cuda", DT)
    gu = torch.randn(R, 2 * INTER, generator=g).to("cuda", DT)
    qkv = torch.randn(R, (H + 2 * HKV) * D, generator=g).to("cuda", DT)
    ang = torch.randn(R, D // 2, generator=g).cuda()
    cos, sin = torch.cat([ang, ang], -1).cos().to(DT), torch.cat([ang, ang], -1).sin().to(DT)
    a, b = qkv.clone(), qkv.clone()
    ew.rope_(a, cos, sin, H + HKV, D)
    ew.rope_ref_(b, cos, sin, H + HKV, D)
    eager = "eager PyTorch ops"
    return [
        (f"residual add + RMSNorm, {R} x {HIDDEN}", eager, cuda_us(lambda: ew.add_rms_norm_ref(x, y, w, 1e-6), reps),
         cuda_us(lambda: ew.add_rms_norm(x, y, w, 1e-6), reps),
         diff(ew.add_rms_norm(x, y, w, 1e-6)[1], ew.add_rms_norm_ref(x, y, w, 1e-6)[1])),
        (f"silu(gate) * up, {R} x {INTER}", eager, cuda_us(lambda: ew.silu_mul_ref(gu), reps),
         cuda_us(lambda: ew.silu_mul(gu), reps), diff(ew.silu_mul(gu), ew.silu_mul_ref(gu))),
        (f"RoPE on q and k, {R} tokens, heads {H}/{HKV}", eager,
         cuda_us(lambda: ew.rope_ref_(qkv, cos, sin, H + HKV, D), reps),
         cuda_us(lambda: ew.rope_(qkv, cos, sin, H + HKV, D), reps), diff(a, b)),
    ]


def tinygemm(w: torch.Tensor, G: int):
    """torch's CUDA int4 kernel (gpt-fast's choice) for the same codes, or None where this build lacks it."""
    try:
        q, s, z = quant.quantize_int4(w, G)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).cuda()  # (N, K/2), high nibble first
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.stack([s.float(), (8 - z.float()) * s.float()], -1).to(DT).cuda()  # (K/G, N, 2)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, G, sz)
    except (RuntimeError, AttributeError):
        return None


def gemm_rows(reps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for N, K in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):  # fused gate/up, down
        w = torch.randn(N, K, generator=g) * 0.02
        dense = w.to("cuda", DT)
        q8, s8 = (t.cuda() for t in quant.quantize_int8(w))
        awq = {k: t.cuda() for k, t in quant.int4_to_awq(*quant.quantize_int4(w, 128)).items()}
        nf4 = {k: t.cuda() for k, t in quant.quantize_nf4(w).items()}
        tg = tinygemm(w, 128)
        for M in (1, 16, 256):
            x = torch.randn(M, K, generator=g).to("cuda", DT)
            base = f"{N} x {K}, M={M}"
            t_dense = cuda_us(lambda: F.linear(x, dense), reps)
            cases = [("int8", lambda: qg.int8_linear_ref(x, q8, s8), lambda: qg.int8_linear(x, q8, s8)),
                     ("AWQ int4 g128", lambda: qg.awq_linear_ref(x, awq["qweight"], awq["qzeros"], awq["scales"], 128),
                      lambda: qg.awq_linear(x, awq["qweight"], awq["qzeros"], awq["scales"], 128)),
                     ("NF4", lambda: qg.nf4_linear_ref(x, nf4, N, K), lambda: qg.nf4_linear(x, nf4, N, K))]
            for name, ref, new in cases:
                rows.append((f"{name} dequant-GEMM, {base}", "dequantize + F.linear", cuda_us(ref, reps),
                             cuda_us(new, reps), diff(new(), ref())))
                rows.append((f"{name} dequant-GEMM, {base}", "dense bf16 cuBLAS", t_dense, rows[-1][3], rows[-1][4]))
            if tg is not None:
                try:
                    t_tg = cuda_us(lambda: tg(x), reps)
                    rows.append((f"AWQ int4 g128 dequant-GEMM, {base}", "torch int4 tinygemm", t_tg,
                                 cuda_us(lambda: qg.awq_linear(x, awq["qweight"], awq["qzeros"], awq["scales"], 128),
                                         reps), diff(tg(x), qg.awq_linear_ref(x, awq["qweight"], awq["qzeros"],
                                                                               awq["scales"], 128))))
                except RuntimeError as e:  # a shape or dtype this build's tinygemm refuses
                    print(f"(torch int4 tinygemm skipped: {str(e).splitlines()[0][:120]})")
                    tg = None
    return rows


def sampler_rows(reps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(64, VOCAB, generator=g)).to("cuda", DT)
    seeds, steps = torch.arange(64, device="cuda"), torch.full((64,), 7, device="cuda")
    rows = []
    for T, top_p in ((1.0, 1.0), (0.8, 0.95)):
        temp = torch.full((64,), T, device="cuda")
        tp = torch.full((64,), top_p, device="cuda")
        params = SamplingParams(temperature=T, top_p=top_p)
        srows = [SampleRow(params, torch.Generator().manual_seed(i)) for i in range(64)]
        name = f"sampling 64 x {VOCAB}, T={T}, top_p={top_p}"
        new = lambda: smp.sample(logits, temp, seeds, steps, top_p=tp)  # noqa: E731
        t_new = cuda_us(new, reps)
        rows.append((name, "engine Sampler (per-row generators)", cuda_us(lambda: Sampler()(logits, srows), reps), t_new,
                     float("nan")))
        ref = lambda: smp.sample_ref(logits, temp, seeds, steps, top_p=tp)  # noqa: E731
        rows.append((name, "PyTorch Gumbel reference", cuda_us(ref, reps), t_new, float((new() != ref()).sum())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import triton

    rows: list[tuple] = []
    with torch.no_grad():
        for S, L in ((64, 512), (8, 4096)):
            rows += decode_rows(S, L, a.reps)
        rows += [prefill_row(8, 0, 512, a.reps), prefill_row(8, 1536, 512, a.reps)]
        for R in (64, 4096):
            rows += elementwise_rows(R, a.reps)
        rows += gemm_rows(a.reps)
        rows += sampler_rows(a.reps)
    dev = torch.cuda.get_device_name()
    print(f"\nlmstack Triton kernels vs PyTorch on {dev} (torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, Qwen2.5-0.5B shapes; median of {a.reps} calls, L2 flushed before each; sampling rows: the\n"
          "diff column counts tokens that differ from the reference, nan where the baseline draws other noise)\n")
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"| {'operation':{w0}s} | {'baseline':{w1}s} | baseline (us) | Triton (us) | speed-up | max abs diff |")
    print(f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|---------------|-------------|----------|--------------|")
    for name, base, t_ref, t_new, d in rows:
        print(f"| {name:{w0}s} | {base:{w1}s} | {t_ref:13.1f} | {t_new:11.1f} | {t_ref / t_new:7.2f}x | {d:12.3g} |")


if __name__ == "__main__":
    main()
