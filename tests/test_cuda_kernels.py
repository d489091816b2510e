"""lmstack/kernels/cuda: every Triton kernel against its PyTorch reference, and each reference against
an independent one (the model's naive attention on unpaged K/V, model/quant.py's dequantization,
the engine's logit filters, the Random123 Philox vectors).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
here before the kernels are imported; fp32 / fp16 only: the interpreter cannot compute in bf16).
On a CUDA machine (scripts/gpu_check.sh) the same tests run compiled on the GPU, plus bf16. Sizes
are tiny (the interpreter runs every program in numpy) but ragged: context lengths that are not
multiples of the block size, 1-token contexts, GQA groups 1 / 2 / 4, sliding windows, split-K.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (imported)
pytest.importorskip("triton")

from lmstack.engine.sampler import filter_logits  # noqa: E402
from lmstack.kernels.cuda import _triton  # noqa: E402
from lmstack.kernels.cuda import decode_attention as dec  # noqa: E402
from lmstack.kernels.cuda import elementwise as ew  # noqa: E402
from lmstack.kernels.cuda import philox, prefill_attention as pre, quant_gemm as qg, sampler  # noqa: E402
from lmstack.model import quant  # noqa: E402
from lmstack.model.attention import naive_attention  # noqa: E402
from lmstack.model.rope import RotaryEmbedding  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not _triton.INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


KERNEL_MODULES = (dec, pre, ew, qg, philox, sampler)


def kernel_call(api, *args, **kwargs):
    """Call a kernel API with every PyTorch reference of the package replaced by a function that fails:
    a silent fallback would make the test compare the reference with itself."""
    saved = [(m, n, getattr(m, n)) for m in KERNEL_MODULES for n in dir(m) if n.endswith(("_ref", "_ref_"))]

    def fell_back(name):
        def fail(*a, **k):
            raise AssertionError(f"{api.__name__} fell back to {name}: the Triton kernel did not run")
        return fail

    for m, n, _ in saved:
        setattr(m, n, fell_back(n))
    try:
        return api(*args, **kwargs)
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = TOL[dtype] * scale
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------- attention
def paged(lens: list[int], page: int, Hkv: int, D: int, dtype: torch.dtype, seed: int = 0):
    """Per-sequence contiguous K/V (L, Hkv, D) scattered into a pool through shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // page) for L in lens]
    width = max(max(need), 1) + 1  # padded tables, one spare column
    nb = sum(need) + 3
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    k_pool = torch.randn(nb, page, Hkv, D, generator=g)  # garbage in unused slots: must never be read
    v_pool = torch.randn(nb, page, Hkv, D, generator=g)
    ks, vs, used = [], [], 0
    for s, L in enumerate(lens):
        blocks = perm[used:used + need[s]]
        used += need[s]
        tables[s, : need[s]] = blocks.int()
        k, v = torch.randn(L, Hkv, D, generator=g), torch.randn(L, Hkv, D, generator=g)
        for j in range(L):
            k_pool[blocks[j // page], j % page], v_pool[blocks[j // page], j % page] = k[j], v[j]
        ks.append(k.to(dtype))
        vs.append(v.to(dtype))
    return k_pool.to(DEV, dtype), v_pool.to(DEV, dtype), tables.to(DEV), ks, vs


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q (n, H, D) as the last n positions of one sequence's unpaged k, v (L, Hkv, D) -> (n, H, D)."""
    o = naive_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                        v.float().transpose(0, 1)[None], causal=True, window=window, scale=scale)
    return o[0].transpose(0, 1)


DECODE_CASES = [  # (H, Hkv, D, page, block_n, window, splits, lens)
    (4, 4, 16, 8, 16, None, 1, [1, 9, 16, 37, 70]),  # MHA (G = 1), ragged lengths, tiles over 2 blocks
    (4, 2, 32, 16, 16, 20, 3, [1, 33, 64, 70]),  # G = 2, window, split-K
    (8, 2, 16, 8, 32, 5, 2, [0, 3, 17, 50]),  # G = 4, window shorter than a tile, a 0-length row
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=["mha", "gqa2-window-split", "gqa4-window"])
def test_paged_decode_attention(dtype, case):
    H, Hkv, D, page, block_n, window, splits, lens = case
    k_pool, v_pool, tables, ks, vs = paged(lens, page, Hkv, D, dtype)
    q = torch.randn(len(lens), H, D, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    ctx = torch.tensor(lens, device=DEV)
    scale = D ** -0.5
    out = kernel_call(dec.paged_decode_attention, q, k_pool, v_pool, tables, ctx, scale, window, num_splits=splits, block_n=block_n)
    ref = dec.paged_decode_attention_ref(q, k_pool, v_pool, tables, ctx, scale, window)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref, dtype)
    for s, L in enumerate(lens):  # the reference against attention over the unpaged K/V
        if L == 0:
            assert torch.equal(out[s].float().cpu(), torch.zeros(H, D))
            continue
        close(ref[s:s + 1].cpu(), naive(q[s:s + 1].cpu(), ks[s], vs[s], scale, window), dtype)


PREFILL_CASES = [  # (H, Hkv, window, [(cached prefix, new tokens)])
    (4, 4, None, [(0, 1), (0, 37), (28, 17), (64, 6)]),  # fresh prompts, chunked prefill, prefix hit
    (4, 2, 11, [(0, 40), (5, 1), (30, 20)]),  # window, G = 2
    (8, 2, None, [(3, 33), (0, 16)]),  # G = 4
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=["mha", "gqa2-window", "gqa4"])
def test_varlen_prefill_attention(dtype, case):
    H, Hkv, window, seqs = case
    D, page = 16, 8
    lens = [p + n for p, n in seqs]
    k_pool, v_pool, tables, ks, vs = paged(lens, page, Hkv, D, dtype, seed=2)
    n_new = [n for _, n in seqs]
    cu = torch.tensor([0] + n_new, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    q = torch.randn(sum(n_new), H, D, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = D ** -0.5
    out = kernel_call(pre.varlen_prefill_attention, q, k_pool, v_pool, tables, cu, seq_lens, scale, window, block_m=16, block_n=16)
    ref = pre.varlen_prefill_attention_ref(q, k_pool, v_pool, tables, cu, seq_lens, scale, window)
    close(out, ref, dtype)
    for s in range(len(seqs)):
        a, b = int(cu[s]), int(cu[s + 1])
        close(ref[a:b].cpu(), naive(q[a:b].cpu(), ks[s], vs[s], scale, window), dtype)


# ------------------------------------------------------------------------------------- elementwise
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual(dtype):
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(3, 5, 40, generator=g).to(DEV, dtype) for _ in range(2))
    w = torch.randn(40, generator=g).to(DEV, dtype)
    close(kernel_call(ew.rms_norm, x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6), dtype)
    s, h = kernel_call(ew.add_rms_norm, x, y, w, 1e-6)
    s_ref, h_ref = ew.add_rms_norm_ref(x, y, w, 1e-6)
    assert torch.equal(s, s_ref)
    close(h, h_ref, dtype)
    if dtype == torch.float32:  # the reference against PyTorch's own RMSNorm
        close(ew.rms_norm_ref(x, w, 1e-6), torch.nn.functional.rms_norm(x, (40,), w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gu = torch.randn(7, 2 * 1100, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)  # 2 column blocks
    out = kernel_call(ew.silu_mul, gu)
    assert out.shape == (7, 1100)
    close(out, ew.silu_mul_ref(gu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_fused_qkv(dtype):
    H, Hkv, D = 4, 2, 16
    qkv = torch.randn(2, 5, (H + 2 * Hkv) * D, generator=torch.Generator().manual_seed(6)).to(DEV, dtype)
    cos, sin = RotaryEmbedding(D, 10000.0, None, 256)(torch.arange(10, device=DEV).view(2, 5) + 40, dtype)
    a, b = qkv.clone(), qkv.clone()
    kernel_call(ew.rope_, a, cos, sin, H + Hkv, D)
    ew.rope_ref_(b, cos, sin, H + Hkv, D)
    close(a, b, dtype)
    assert torch.equal(a[..., (H + Hkv) * D:], qkv[..., (H + Hkv) * D:])  # v heads untouched
    assert not torch.equal(a[..., : H * D], qkv[..., : H * D])


# ----------------------------------------------------------------------------------- quantized GEMM
def _weights(N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g), torch.randn(N, generator=g)


def _x(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEV, dtype)


# outputs of magnitude ~10 (K = 96-256 unit-variance products): fp32 exact up to summation order;
# 16-bit kernels round the decoded weight tile and the output to x's dtype
GEMM_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-2, 5e-3), torch.bfloat16: (0.4, 3e-2)}


def gemm_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = GEMM_TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,split", [(1, 3), (20, None)])
def test_int8_linear(dtype, M, split):
    w, b = _weights(48, 128, 7)
    q, s = quant.quantize_int8(w)
    x = _x(M, 128, dtype)
    q, s, b = q.to(DEV), s.to(DEV), b.to(DEV, dtype)
    out = kernel_call(qg.int8_linear, x, q, s, b, block_k=32, split_k=split)
    ref = x.float() @ quant.dequantize_int8(q, s).t() + b.float()  # fp32 weights: the exact product
    gemm_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,G,split", [(1, 32, 2), (5, 64, None), (20, 128, None)])
def test_awq_int4_linear(dtype, M, G, split):
    N, K = 48, 256
    w, b = _weights(N, K, 8)
    q, s, z = quant.quantize_int4(w, G)
    awq = {k: v.to(DEV) for k, v in quant.int4_to_awq(q, s, z).items()}
    # the reference's AWQ unpacking against the unpacked codes (the kernel decodes the packed words)
    w_ref = quant.dequantize_int4(q, s, z, G)
    assert torch.equal(qg.awq_dequantize_ref(awq["qweight"].cpu(), awq["qzeros"].cpu(), awq["scales"].cpu(), G), w_ref)
    x = _x(M, K, dtype)
    out = kernel_call(qg.awq_linear, x, awq["qweight"], awq["qzeros"], awq["scales"], G, b.to(DEV, dtype), split_k=split)
    gemm_close(out, x.float().cpu() @ w_ref.t() + b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,split", [(1, 128, 2), (20, 96, None)])  # K % 64 == 0 (aligned blocks) and not
def test_nf4_linear_and_dequantize(dtype, M, K, split):
    N = 40
    w, _ = _weights(N, K, 9)
    t = {k: v.to(DEV) for k, v in quant.quantize_nf4(w).items()}
    # the reference against the format written out: level[code] * double-dequantized absmax[block]
    tc = {k: v.cpu() for k, v in t.items()}
    codes = quant.unpack_int4(tc["codes"]).long()[: N * K]
    w_ref = (quant.NF4_CODEBOOK[codes] * quant.nf4_absmax(tc).repeat_interleave(quant.NF4_BLOCK)[: N * K]).view(N, K)
    assert torch.equal(qg.nf4_dequantize_ref(t, (N, K), torch.float32).cpu(), w_ref)
    x = _x(M, K, dtype)
    out = kernel_call(qg.nf4_linear, x, t, N, K, block_k=32, split_k=split)
    gemm_close(out, x.float().cpu() @ w_ref.t(), dtype)
    wd = kernel_call(qg.nf4_dequantize, t, (N, K), dtype)
    assert wd.dtype == dtype
    # exact on the interpreter; a GPU may fuse absmax's multiply-add (FMA): one rounding fewer
    torch.testing.assert_close(wd.float().cpu(), w_ref.to(dtype).float(), atol=1e-6, rtol=TOL[dtype])


def test_int4_block_k_never_straddles_a_group():
    assert [qg.int4_block_k(g) for g in (32, 64, 128, 256, 96, 8)] == [32, 64, 128, 128, 32, 0]


# --------------------------------------------------------------------------------------- sampling
def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors (kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(v) for v in philox.philox4x32_ref(*ctr, *key)) == want


def test_gumbel_noise_kernel_matches_reference():
    seeds = torch.tensor([0, 12345, -7, 2 ** 40 + 3], device=DEV)  # negative and > 32-bit seeds
    steps = torch.tensor([0, 5, 2 ** 33 + 1, 77], device=DEV)
    g = kernel_call(philox.gumbel_noise, seeds, steps, 300, block=128)
    torch.testing.assert_close(g.cpu(), philox.gumbel_noise_ref(seeds.cpu(), steps.cpu(), 300), atol=1e-5, rtol=1e-5)
    assert abs(float(g.mean()) - 0.5772) < 0.1 and abs(float(g.std()) - math.pi / 6 ** 0.5) < 0.1  # Gumbel(0, 1)


def _rows(N: int, V: int, seed: int = 10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 3
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.5, 2.0, 1.0])[:N]
    top_k = torch.tensor([0, 0, 5, 0, 20, 3, 0, 1])[:N]
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.8, 1.0, 0.95, 1.0])[:N]
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.1, 0.0])[:N]
    return logits, temp, top_k, top_p, min_p


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_kernel_matches_reference_and_is_batch_independent(dtype):
    logits, temp, top_k, top_p, min_p = (t.to(DEV) for t in _rows(8, 300))
    logits = logits.to(dtype)
    seeds = torch.arange(100, 108, device=DEV)
    steps = torch.arange(8, device=DEV) * 3
    tok = kernel_call(sampler.sample, logits, temp, seeds, steps, top_k, top_p, min_p, block_v=128)
    ref = sampler.sample_ref(logits, temp, seeds, steps, top_k, top_p, min_p)
    # the kernel's token maximizes the reference's perturbed score (exact ties aside: log may differ in
    # its last bit between a GPU and PyTorch)
    x = logits.float()
    inv_t = torch.where(temp > 0, 1 / temp.clamp_min(1e-30), 0.0)
    thr = sampler.filter_threshold(x * inv_t[:, None], top_k, top_p, min_p)
    score = torch.where(x * inv_t[:, None] >= thr[:, None], x * inv_t[:, None] + philox.gumbel_noise_ref(seeds, steps, 300),
                        float("-inf"))
    score[0] = x[0]  # row 0 is greedy
    assert bool((score.gather(1, tok[:, None])[:, 0] >= score.gather(1, ref[:, None])[:, 0] - 1e-4).all())
    assert torch.equal(tok[0], x[0].argmax())
    # each row alone, and the batch reversed: the same tokens
    for i in range(8):
        one = kernel_call(sampler.sample, logits[i:i + 1], temp[i:i + 1], seeds[i:i + 1], steps[i:i + 1], top_k[i:i + 1],
                             top_p[i:i + 1], min_p[i:i + 1], block_v=128)
        assert int(one) == int(tok[i])
    rev = torch.arange(7, -1, -1, device=DEV)
    back = kernel_call(sampler.sample, logits[rev], temp[rev], seeds[rev], steps[rev], top_k[rev], top_p[rev], min_p[rev], block_v=128)
    assert torch.equal(back[rev], tok)


def test_greedy_ties_take_the_first_index_across_chunks():
    logits = torch.zeros(1, 300, device=DEV)
    logits[0, 200] = logits[0, 10] = 5.0  # tied maximum in different 128-wide chunks
    tok = kernel_call(sampler.sample, logits, torch.zeros(1, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV),
                         torch.zeros(1, dtype=torch.long, device=DEV), block_v=128)
    assert int(tok) == 10


def test_filter_threshold_keeps_what_the_engine_keeps():
    logits, temp, top_k, top_p, min_p = _rows(8, 300)
    scaled = logits / temp.clamp_min(0.1)[:, None]
    for rows in ([2, 3, 4, 6], [5, 7]):  # with top-p, and top-k / min-p only (no sort in either)
        r = torch.tensor(rows)
        thr = sampler.filter_threshold(scaled[r], top_k[r], top_p[r], min_p[r])
        keep = filter_logits(scaled[r].clone(), top_k[r], top_p[r], min_p[r]) > float("-inf")
        assert torch.equal(scaled[r] >= thr[:, None], keep)


def test_sample_distribution_matches_softmax():
    """4,000 draws of one row (same seed, steps 0..3999) follow softmax(filtered logits / T)."""
    n, V = 4000, 6
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]).expand(n, V)
    temp = torch.full((n,), 0.8)
    top_p = torch.full((n,), 0.95)
    tok = sampler.sample_ref(logits, temp, torch.full((n,), 42), torch.arange(n), top_p=top_p)
    keep = filter_logits(logits[:1] / 0.8, torch.zeros(1, dtype=torch.long), top_p[:1], torch.zeros(1))
    p = keep.softmax(-1)[0]
    freq = torch.bincount(tok, minlength=V).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 4.5 * sigma + 1e-9).all()), (freq, p)
    assert int(freq[p == 0].sum()) == 0  # filtered tokens never drawn
