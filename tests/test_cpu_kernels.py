"""The C++ PagedAttention decode kernel against dense attention computed independently over each
sequence's K/V rows, read position by position through its block table."""
from __future__ import annotations

import math

import pytest
import torch

from lmstack import cpu_kernels


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
    cpu = torch.device("cpu")
    assert cpu_kernels.supports(torch.float32, cpu) and cpu_kernels.supports(torch.bfloat16, cpu)
    assert not cpu_kernels.supports(torch.float16, cpu)
    assert not cpu_kernels.supports(torch.bfloat16, torch.device("meta"))
    monkeypatch.setenv("LMSTACK_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled()


def test_failed_build_says_why_and_falls_back(monkeypatch, caplog):
    """No compiler (here: a builder that raises): one warning naming the cause, then PyTorch ops."""
    import torch.utils.cpp_extension as cpp

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setenv("LMSTACK_CPU_KERNELS", "1")  # the switch must not hide the build from this test
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", False)
    monkeypatch.setattr(cpp, "load", no_compiler)
    with caplog.at_level("WARNING", logger="lmstack.cpu_kernels"):
        assert cpu_kernels.load() is None
        assert cpu_kernels.load() is None  # not retried
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "g++: command not found" in msgs[0] and "PyTorch ops" in msgs[0]
    with torch.no_grad():
        assert not cpu_kernels.fast(torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_fused_elementwise_equal_the_pytorch_ops(kernels, dtype, rows):
    """Each fused op against the eager chain it replaces. bf16 rounds at the same points as that chain,
    so results are equal; fp32 within the last bit of rsqrt / exp / summation order."""
    import torch.nn.functional as F

    from lmstack.model.layers import RMSNorm
    from lmstack.model.rope import apply_rope

    g = torch.Generator().manual_seed(rows)
    exact = dtype == torch.bfloat16
    close = dict(atol=0, rtol=0) if exact else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        C = 72  # not a multiple of 16: the vector loop and its scalar tail both run
        x, y = (torch.randn(rows, C, generator=g).to(dtype) for _ in range(2))
        norm = RMSNorm(C, eps=1e-5).to(dtype)
        norm.weight.copy_(torch.randn(C, generator=g))

        def eager_norm(t):  # RMSNorm.forward's PyTorch chain (the module itself would call the kernel)
            h = t.float()
            return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)

        # bf16: one ulp where fp32 summation order moves the rsqrt across a rounding boundary
        norm_tol = dict(atol=0.02, rtol=0.01) if exact else close
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.eps), eager_norm(x), **norm_tol)
        s, h = kernels.add_rms_norm(x, y, norm.weight, norm.eps)
        assert torch.equal(s, x + y)
        torch.testing.assert_close(h, eager_norm(x + y), **norm_tol)

        gu = (3 * torch.randn(rows, 2 * 40, generator=g)).to(dtype)
        gate, up = gu.split(40, -1)
        torch.testing.assert_close(kernels.silu_mul(gu), F.silu(gate) * up, **close)

        H, Hkv, D = 3, 1, 32
        qkv = torch.randn(1, rows, (H + 2 * Hkv) * D, generator=g).to(dtype)
        ang = torch.randn(1, rows, D // 2, generator=g)
        cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
        q, k, v = (t.clone() for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
        kernels.rope_(qkv, cos, sin, H + Hkv, D)
        q2, k2, v2 = qkv.split([H * D, Hkv * D, Hkv * D], -1)
        torch.testing.assert_close(q2.view(1, rows, H, D), apply_rope(q.view(1, rows, H, D), cos, sin), atol=0, rtol=0)
        torch.testing.assert_close(k2.view(1, rows, Hkv, D), apply_rope(k.view(1, rows, Hkv, D), cos, sin), atol=0, rtol=0)
        assert torch.equal(v2, v)  # v untouched


def test_model_uses_the_kernels_only_without_autograd(kernels, monkeypatch):
    """A decoder's no-grad CPU forward (fused kernels) equals its autograd forward (PyTorch ops)."""
    from lmstack.config import ModelConfig
    from lmstack.model.layers import fuse_projections
    from lmstack.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0.2)
    fuse_projections(model)
    tokens = torch.randint(0, 64, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    calls = []
    for name in ("rms_norm", "add_rms_norm", "silu_mul", "rope_"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    with torch.no_grad():
        fast = model(tokens, pos)
    assert sorted(set(calls)) == ["add_rms_norm", "rms_norm", "rope_", "silu_mul"]
    calls.clear()
    slow = model(tokens, pos).detach()  # grad on: the eager ops, separate projections
    assert calls == []
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
