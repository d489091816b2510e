"""The C++ PagedAttention decode kernel against dense attention computed independently over each
sequence's K/V rows, read position by position through its block table."""
from __future__ import annotations

import math

import pytest
import torch

from lmstack.engine import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.load() is None:
        pytest.skip("the C++ kernels could not be built here (no compiler?); the engine uses its PyTorch path")
    return cpu_kernels


def reference(q, k_pool, v_pool, block_tables, ctx_lens, window):
    """Per sequence: its pool rows in order (block_tables[s][t // bs], t % bs), then softmax attention in
    float64 over the visible positions."""
    S, H, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(S, H, D, dtype=torch.float64)
    for s in range(S):
        L = int(ctx_lens[s])
        pos = range(max(0, L - window) if window else 0, L)
        k = torch.stack([k_pool[block_tables[s, t // bs], t % bs] for t in pos]).double()  # (n, Hkv, D)
        v = torch.stack([v_pool[block_tables[s, t // bs], t % bs] for t in pos]).double()
        for h in range(H):
            kv = h // (H // Hkv)  # GQA: query head h reads KV head h // G
            w = torch.softmax(k[:, kv] @ q[s, h].double() / math.sqrt(D), 0)
            out[s, h] = w @ v[:, kv]
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("H,Hkv,D,bs,window", [
    (9, 3, 64, 16, None),   # SmolLM2-like GQA, AVX-512 path
    (14, 2, 64, 16, 37),    # Qwen2.5-like, sliding window shorter than most contexts
    (4, 4, 24, 8, None),    # MHA, head_dim not a multiple of 16: the portable path
    (8, 1, 32, 4, 5),       # MQA, tiny blocks and window
])
def test_matches_dense_attention(kernels, dtype, atol, H, Hkv, D, bs, window):
    g = torch.Generator().manual_seed(H * 100 + D)
    S, NB = 6, 120
    k_pool = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    ctx_lens = torch.tensor([1, 2, bs, bs + 1, 57, 150])  # block edges and partial blocks
    nblk = -(-int(ctx_lens.max()) // bs)
    # each sequence owns distinct, shuffled blocks; table rows padded with block 0 as the runner does
    perm = torch.randperm(NB, generator=g)
    block_tables = torch.zeros(S, nblk, dtype=torch.long)
    used = 0
    for s, L in enumerate(ctx_lens.tolist()):
        n = -(-L // bs)
        block_tables[s, :n] = perm[used:used + n]
        used += n
    q = torch.randn(S, H, D, generator=g).to(dtype)
    out = kernels.paged_decode_attention(q, k_pool, v_pool, block_tables, ctx_lens, D ** -0.5, window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, block_tables, ctx_lens, window),
                               atol=atol, rtol=0)
    # a row's result does not depend on the other rows of the batch
    alone = kernels.paged_decode_attention(q[4:5], k_pool, v_pool, block_tables[4:5], ctx_lens[4:5], D ** -0.5, window)
    assert torch.equal(alone, out[4:5])


def test_supports_and_disable_switch(monkeypatch):
    f32 = torch.zeros(2, 4, 2, 8)
    assert cpu_kernels.supports(f32, f32)
    assert not cpu_kernels.supports(f32, f32.half())
    assert not cpu_kernels.supports(f32, f32.transpose(1, 2))  # a non-contiguous pool
    monkeypatch.setenv("LMSTACK_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled()
