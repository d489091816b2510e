"""Variable-length prefill attention over the paged KV cache (FlashAttention-2 style, in Triton).

One launch for every prefill chunk of a step. The chunks' new tokens are packed into one row
(vLLM / flash_attn_varlen_func's layout):
  q            (T, H, D)       the new tokens of all sequences, sequence s at rows
                               cu_seqlens_q[s] : cu_seqlens_q[s + 1]
  k/v pools    (num_blocks, block_size, Hkv, D); the new tokens' K/V already written (the engine
                               writes them before attention, as for decodes)
  block_tables (S, max_blocks) int; seq_lens (S,) int: each sequence's context length *including*
                               its new tokens, so its cached prefix is seq_lens - n_new tokens
  out          (T, H, D)       in q's dtype
Query i of sequence s sits at absolute position p = seq_lens[s] - n_new[s] + i and sees key j iff
j <= p (causal) and, under a sliding window W, p - j < W. Chunked prefill, prefix-cache hits and
recompute after preemption are all "a prefix plus new tokens"; a fresh prompt is prefix 0.

Algorithm (FlashAttention-2, Dao 2023; the handbook's sec. 18-22): program (query block, head)
holds one BLOCK_M x D tile of queries (the outer loop, parallel across programs: FA-2's change
from FA-1, whose outer loop ran over K/V) and streams K/V tiles of BLOCK_N tokens through it (the
inner loop), keeping only the running row max m, row sum l and the unnormalized output acc in
registers, never the (BLOCK_M, context) score matrix:
  s = q k^T * scale;  m' = max(m, rowmax(s));  acc = acc * e^(m - m') + e^(s - m') v;
  l = l * e^(m - m') + rowsum(e^(s - m'));  out = acc / l   (once, at the end: FA-2's deferral)
The K/V loop covers only the band a query block can see: from the window start of its first
query (or 0) to the position of its last query; keys past the diagonal are never loaded. Scores,
m, l and acc are fp32; P is rounded to V's dtype for the second product (as FlashAttention does).
GQA: query head h reads KV head h // G; the G heads of a KV head are separate programs whose
K/V reads mostly hit L2 (packing the G heads into one tile, as the decode kernel does, is a
possible later optimization for prefill).
"""
import torch

from lmstack.kernels.cuda._triton import dot_precision, pow2, tl, triton, usable
from lmstack.kernels.cuda.decode_attention import LOG2E
from lmstack.model.attention import attention


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, lens_ptr, o_ptr,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_bt, stride_ot, stride_oh, scale_log2, window, q_blocks,
                    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_WINDOW: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s = pid // q_blocks
    qb = pid % q_blocks
    q0 = tl.load(cu_ptr + s)
    nq = tl.load(cu_ptr + s + 1) - q0
    if qb * BLOCK_M >= nq:  # the grid is sized by the longest chunk: shorter ones stop here
        return
    L = tl.load(lens_ptr + s)
    first = L - nq  # absolute position of the sequence's first new token
    kvh = h // G

    r = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of this sequence's chunk
    rmask = r < nq
    pos_q = first + r
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (q0 + r)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    hi = first + tl.minimum(qb * BLOCK_M + BLOCK_M, nq)  # one past the last query's position
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first + qb * BLOCK_M - window + 1, 0)  # the first query's window start
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + n  # (BLOCK_N,) key positions
        kvalid = kpos < hi
        blk = tl.load(bt_ptr + s * stride_bt + kpos // PAGE, mask=kvalid, other=0).to(tl.int64)
        row_k = blk * stride_kb + (kpos % PAGE) * stride_kt + kvh * stride_kh
        row_v = blk * stride_vb + (kpos % PAGE) * stride_vt + kvh * stride_vh
        kT = tl.load(k_ptr + row_k[None, :] + d[:, None], mask=kvalid[None, :] & dmask[:, None], other=0.0)
        sc = tl.dot(q, kT, input_precision=PREC) * scale_log2  # (BLOCK_M, BLOCK_N), base-2 logits
        # masks on every tile, not only the diagonal ones: simpler, and cheap next to the two products
        vis = kvalid[None, :] & (kpos[None, :] <= pos_q[:, None])
        if USE_WINDOW:
            vis = vis & (pos_q[:, None] - kpos[None, :] < window)
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        # a row that has seen no visible key yet (window rows before their band, padding rows)
        # keeps m = -inf: subtract 0 there instead, so exp2(-inf - -inf) never makes a NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row_v[:, None] + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # every real row sees at least its own key
    tl.store(o_ptr + (q0 + r)[:, None] * stride_ot + h * stride_oh + d[None, :], out,
             mask=rmask[:, None] & dmask[None, :])


def varlen_prefill_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                 block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                 scale: float, window: int | None = None) -> torch.Tensor:
    """The reference (and fallback): per sequence, gather its context from the pool and run the
    model's SDPA attention with the query offset (what engine/model_runner.py does today)."""
    T, H, D = q.shape
    page = k_pool.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for s, L in enumerate(seq_lens.tolist()):
        a, b = cu[s], cu[s + 1]
        if b == a:
            continue
        blocks = block_tables[s, : -(-L // page)].long()
        k = k_pool[blocks].flatten(0, 1)[:L].transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = v_pool[blocks].flatten(0, 1)[:L].transpose(0, 1)[None]
        o = attention(q[a:b].transpose(0, 1)[None], k, v, impl="sdpa", causal=True, window=window,
                      q_offset=L - (b - a), scale=scale)  # (1, H, n, D)
        out[a:b] = o[0].transpose(0, 1)
    return out


def varlen_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                             window: int | None = None, max_seqlen_q: int | None = None,
                             block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                             num_stages: int = 2) -> torch.Tensor:
    """q (T, H, D) -> (T, H, D); see the module docstring. The Triton kernel where `usable`, else the
    reference. max_seqlen_q: the longest chunk (sizes the grid; computed with a device sync when
    None). block_m x block_n = 64 x 64 for head_dim <= 128: the tile FlashAttention-2's Triton
    tutorial uses on A100 / H100 with 4 warps (the lead measures alternatives on the H200)."""
    T, H, D = q.shape
    nb, page, Hkv, Dk = k_pool.shape
    S = seq_lens.shape[0]
    if Dk != D or H % Hkv or v_pool.shape != k_pool.shape or cu_seqlens_q.shape[0] != S + 1:
        raise ValueError(f"varlen_prefill_attention: q {tuple(q.shape)}, pools {tuple(k_pool.shape)}, "
                         f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and seq_lens {tuple(seq_lens.shape)} do not match")
    if not (usable(q, k_pool, v_pool, block_tables, cu_seqlens_q, seq_lens) and q.dtype == k_pool.dtype == v_pool.dtype):
        return varlen_prefill_attention_ref(q, k_pool, v_pool, block_tables, cu_seqlens_q, seq_lens, scale, window)
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("varlen_prefill_attention: q, the pools and block_tables need a contiguous last dimension")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    if T == 0 or S == 0:
        return out
    q_blocks = triton.cdiv(max_seqlen_q, block_m)
    _prefill_kernel[(S * q_blocks, H)](
        q, k_pool, v_pool, block_tables, cu_seqlens_q, seq_lens, out,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale) * LOG2E, int(window or 0), q_blocks,
        G=H // Hkv, D=D, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(D),
        USE_WINDOW=bool(window), PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out
