"""Paged decode attention: one launch for every decoding sequence, K/V read in place from the pool.

Shapes (the engine's, see engine/model_runner.py):
  q            (S, H, D)       one new query token per decoding sequence (after RoPE)
  k/v pools    (num_blocks, block_size, Hkv, D)   the paged KV cache of one layer
  block_tables (S, max_blocks) int, physical block of each logical block (padding entries unused)
  ctx_lens     (S,) int        tokens in each sequence's context, the new one included (its K/V
                               already written to the pool)
  out          (S, H, D)       in q's dtype
Query head h reads KV head h // G (G = H / Hkv, GQA); key position j is visible iff
j < ctx_len and, under a sliding window W, ctx_len - 1 - j < W (Mistral's convention, as in
model/attention.py). A sequence with ctx_len 0 gets zeros.

Algorithm (PagedAttention, Kwon et al. 2023, with FlashAttention's online softmax and
flash-decoding's split-K): program (s, kv head, split) loads the G query rows that share one KV
head as one (BLOCK_G, D) tile, so each K/V tile is read once for all G heads and the score
product is a real matrix product (tl.dot needs M >= 16: BLOCK_G is G padded to 16). It walks its
share of the context in tiles of BLOCK_N tokens; a tile gathers its tokens' pool rows through the
block table (tokens of a tile may come from several blocks). Scores and the softmax statistics are
fp32: running max m, running sum l, accumulator acc rescaled by exp(m_old - m_new) per tile.
With num_splits > 1 (long contexts, few sequences: too few programs to fill the GPU) each split
writes its normalized partial output and log-sum-exp, and a second kernel merges them:
  out = sum_i exp(lse_i - lse_max) o_i / sum_i exp(lse_i - lse_max).
Softmax runs in base 2 (exp2 of scores pre-multiplied by log2 e, as FlashAttention's kernels do:
one multiply folded into the scale instead of a natural exp per score).
"""
import math

import torch

from lmstack.kernels.cuda._triton import dot_precision, pow2, sm_count, tl, triton, usable

LOG2E = math.log2(math.e)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
                   stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_bt, stride_os, stride_oh, stride_op,
                   scale_log2, window,
                   G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   USE_WINDOW: tl.constexpr, PREC: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(lens_ptr + s)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(L - window, 0)
    # this split's tiles of [lo, L): each sequence divides its own tiles, so no host-side maximum is
    # needed (a CUDA graph captures num_splits only)
    n_tiles = tl.cdiv(L - lo, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g  # (BLOCK_G,) query heads of this KV head
    gmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t in range(t0, t1):
        pos = lo + t * BLOCK_N + n  # (BLOCK_N,) context positions
        valid = pos < L
        blk = tl.load(bt_ptr + s * stride_bt + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row_k = blk * stride_kb + (pos % PAGE) * stride_kt + kvh * stride_kh  # pool offset of each token
        row_v = blk * stride_vb + (pos % PAGE) * stride_vt + kvh * stride_vh
        kT = tl.load(k_ptr + row_k[None, :] + d[:, None], mask=valid[None, :] & dmask[:, None], other=0.0)  # (D, N)
        sc = tl.dot(q, kT, input_precision=PREC) * scale_log2  # (BLOCK_G, BLOCK_N) fp32, base-2 logits
        sc = tl.where(valid[None, :], sc, float("-inf"))
        # every tile of [lo, L) holds >= 1 valid position, so m_new is finite from the first tile on
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row_v[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)  # (N, D)
        # P is rounded to V's dtype for the second product (FlashAttention does the same)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new

    empty = l == 0.0  # an empty split (or ctx_len 0): zeros, and lse -inf so the merge ignores it
    out = acc / tl.where(empty, 1.0, l)[:, None]
    o_off = s * stride_os + heads[:, None] * stride_oh + split * stride_op + d[None, :]
    tl.store(o_ptr + o_off, out, mask=gmask[:, None] & dmask[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))
        tl.store(lse_ptr + (s * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split, lse, mask=gmask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, o_ptr, stride_os, stride_oh,
                  D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """part (S, H, P, D) fp32 normalized partial outputs, lse (S, H, P) base-2 -> out (S, H, D)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pmask = p < NUM_SPLITS
    lse = tl.load(lse_ptr + (s * H + h) * NUM_SPLITS + p, mask=pmask, other=float("-inf"))
    top = tl.max(lse, 0)  # -inf only for ctx_len 0 (every split empty): then all weights are 0
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    w = tl.where(pmask, w, 0.0)
    part = tl.load(part_ptr + ((s * H + h) * NUM_SPLITS + p)[:, None] * D + d[None, :],
                   mask=pmask[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_P, BLOCK_D)
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(o_ptr + s * stride_os + h * stride_oh + d, out, mask=d < D)


def paged_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                               window: int | None = None) -> torch.Tensor:
    """The PyTorch reference (and the fallback): gather every sequence's blocks into one padded
    (S, T, Hkv, D) copy, masked fp32 softmax. Same shapes and masking as the kernel."""
    S, H, D = q.shape
    _, page, Hkv, _ = k_pool.shape
    G = H // Hkv
    T = block_tables.shape[1] * page
    bt = block_tables.long()
    k = k_pool[bt].reshape(S, T, Hkv, D)  # (S, max_blocks * page, Hkv, D)
    v = v_pool[bt].reshape(S, T, Hkv, D)
    qg = q.view(S, Hkv, G, D).float()  # (S, Hkv, G, D): the G query heads of each KV head
    sc = torch.einsum("shgd,sthd->shgt", qg, k.float()) * scale  # (S, Hkv, G, T)
    pos = torch.arange(T, device=q.device)
    lens = ctx_lens.to(q.device).long()[:, None]  # (S, 1)
    vis = pos[None, :] < lens
    if window:
        vis = vis & (lens - 1 - pos[None, :] < window)
    sc = sc.masked_fill(~vis[:, None, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1).nan_to_num(0.0)  # ctx_len 0: no visible key -> zeros
    out = torch.einsum("shgt,sthd->shgd", p, v.float())  # (S, Hkv, G, D)
    return out.reshape(S, H, D).to(q.dtype)


def default_splits(q: torch.Tensor, num_kv_heads: int, max_ctx: int, block_n: int) -> int:
    """flash-decoding's split count: enough programs for ~4 per SM, each split >= 2 tiles, at most 16.
    One split on the interpreter (CPU), where parallelism buys nothing."""
    if q.device.type != "cuda":
        return 1
    sms = sm_count(q.device)
    programs = q.shape[0] * num_kv_heads
    want = triton.cdiv(4 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(max_ctx, 2 * block_n), 16))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, scale: float, window: int | None = None,
                           num_splits: int | None = None, block_n: int = 64, max_ctx_len: int | None = None,
                           num_warps: int = 4) -> torch.Tensor:
    """q (S, H, D) -> (S, H, D); see the module docstring. The Triton kernel where `usable`, else
    the reference. num_splits None: `default_splits` from `max_ctx_len` (default: the block table's
    width times the block size, known without a device sync). block_n: tokens per K/V tile (64 on a
    GPU: a 64 x 64 fp16 K tile is 8 KiB, small enough for 2-3 tiles in flight per SM; must be a power
    of two >= 16)."""
    S, H, D = q.shape
    nb, page, Hkv, Dk = k_pool.shape
    if Dk != D or H % Hkv or v_pool.shape != k_pool.shape:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not match the pools {tuple(k_pool.shape)} "
                         f"/ {tuple(v_pool.shape)} (need the same head_dim and H divisible by Hkv)")
    if not (usable(q, k_pool, v_pool, block_tables, ctx_lens) and q.dtype == k_pool.dtype == v_pool.dtype):
        return paged_decode_attention_ref(q, k_pool, v_pool, block_tables, ctx_lens, scale, window)
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("paged_decode_attention: q, the pools and block_tables need a contiguous last dimension")
    G = H // Hkv
    if num_splits is None:
        num_splits = default_splits(q, Hkv, max_ctx_len or block_tables.shape[1] * page, block_n)
    out = torch.empty_like(q)
    if num_splits > 1:
        part = torch.empty(S, H, num_splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(S, H, num_splits, dtype=torch.float32, device=q.device)
        dst, strides = part, (part.stride(0), part.stride(1), part.stride(2))
    else:
        lse, dst, strides = out, out, (out.stride(0), out.stride(1), 0)  # lse unused with one split
    _decode_kernel[(S, Hkv, num_splits)](
        q, k_pool, v_pool, block_tables, ctx_lens, dst, lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_tables.stride(0), *strides,
        float(scale) * LOG2E, int(window or 0),
        G=G, D=D, PAGE=page, NUM_SPLITS=num_splits, BLOCK_G=pow2(G), BLOCK_D=pow2(D), BLOCK_N=block_n,
        USE_WINDOW=bool(window), PREC=dot_precision(q.dtype), num_warps=num_warps)
    if num_splits > 1:
        _merge_kernel[(S, H)](part, lse, out, out.stride(0), out.stride(1), D=D, NUM_SPLITS=num_splits,
                              BLOCK_P=pow2(num_splits, 2), BLOCK_D=pow2(D))
    return out
