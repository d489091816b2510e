"""naive == sdpa == tiled attention, and RoPE's relative-position property."""
from __future__ import annotations

import pytest
import torch

from lmstack.model.attention import attention
from lmstack.model.rope import RotaryEmbedding, apply_rope


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])  # MHA, MQA, GQA
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("tq,tk", [(37, 37), (5, 37), (1, 37)])  # prefill, chunked prefill, decode
def test_impls_agree(heads, kv_heads, window, tq, tk):
    torch.manual_seed(0)
    B, D = 2, 16
    q = torch.randn(B, heads, tq, D)
    k = torch.randn(B, kv_heads, tk, D)
    v = torch.randn(B, kv_heads, tk, D)
    pad = torch.ones(B, tk, dtype=torch.bool)
    pad[1, :9] = False  # row 1 is left-padded
    for mask in (None, pad):
        ref = attention(q, k, v, impl="naive", window=window, key_padding_mask=mask)
        for impl in ("sdpa", "tiled"):
            kw = {}
            out = attention(q, k, v, impl=impl, window=window, key_padding_mask=mask, **kw)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{impl} window={window}")


def test_tiled_small_blocks_and_noncausal():
    from lmstack.model.attention import tiled_attention, naive_attention

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    for causal in (True, False):
        ref = naive_attention(q, k, v, causal=causal)
        out = tiled_attention(q, k, v, causal=causal, block_q=8, block_k=16)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_repeated_kv_mha():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 6, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    gqa = attention(q, k, v, impl="naive")
    mha = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), impl="naive")
    torch.testing.assert_close(gqa, mha)


def test_causality_future_tokens_do_not_leak():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    for impl in ("naive", "sdpa", "tiled"):
        a = attention(q, k, v, impl=impl)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 8:] += 5
        v2[:, :, 8:] += 5
        b = attention(q, k2, v2, impl=impl)
        torch.testing.assert_close(a[:, :, :8], b[:, :, :8])
        assert not torch.allclose(a[:, :, 8:], b[:, :, 8:])


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_dot_product_depends_only_on_relative_position(scaling):
    torch.manual_seed(4)
    D = 32
    rope = RotaryEmbedding(D, 10000.0, scaling, max_pos=256)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def dot(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    for offset in (0, 17, 900):
        assert dot(10 + offset, 3 + offset) == pytest.approx(dot(10, 3), rel=1e-4, abs=1e-4)
    assert dot(10, 3) != pytest.approx(dot(10, 4), rel=1e-3)
    # rotation preserves norms
    c, s = rope(torch.tensor([[123]]), torch.float32)
    if scaling is None or scaling["rope_type"] != "yarn":  # yarn also scales by its attention factor
        torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm())
