"""Pure-decode engine steps on CPU in one C++ call (csrc/decode_layers.cpp): every decoder layer back to
back without returning to Python, the CPU counterpart of replaying a captured CUDA graph.

Why: a decode step of a small model is dominated by interpreter overhead. The eager forward makes ~20
module calls and tensor ops per layer, about 0.2-0.3 ms of Python per layer here, as much as the
layer's weight streaming (SmolLM2-135M shape, 32 sequences). The C++ loop runs the same kernels (oneDNN
linears on the same packed weights, lmstack's norm / RoPE / silu / PagedAttention kernels) at the same
rounding points, so its hidden states equal the eager path's bit for bit (tests/test_cpu_decode.py).

Which models: the Llama-style decoder (RMSNorm, RoPE without q/k norms, SwiGLU MLP, optional q/k/v /
o / MLP biases) whose projections are still the plain fused Linears the engine set up. A LoRA or
quantized-linear swap, GPT-2 (LayerNorm, learned positions), Qwen3 (q/k norms), and every step that
carries a prefill chunk run `model(tokens, positions, meta=PagedMeta)` instead. `plan()` checks this
every step (a swap or a dtype change between steps is seen), in ~0.1 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack import cpu_kernels
from lmstack.model import layers
from lmstack.model.layers import FusedLinears, Linear, RMSNorm
from lmstack.model.transformer import Transformer

# how each projection is computed (csrc/decode_layers.cpp LinearMode; mirrors layers._project)
PLAIN, ONEDNN, PACKED, PACKED_FP32 = 0, 1, 2, 3


def _mode(packed: layers.PackedWeight | None, weight: torch.Tensor, act: torch.dtype) -> int:
    if packed is not None:
        if act == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return PACKED
        if packed.from_fp32 and act == torch.float32 and weight.dtype == torch.float32:
            return PACKED_FP32
    if layers._ONEDNN and act == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous():
        return ONEDNN
    return PLAIN


@dataclass
class DecodePlan:
    """Per-layer tensors for decode_layers (weights already packed where the mode says so)."""

    in_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    final_norm: torch.Tensor
    qkv: list[torch.Tensor]
    qkv_b: list[torch.Tensor | None]
    o: list[torch.Tensor]
    o_b: list[torch.Tensor | None]
    gu: list[torch.Tensor]
    gu_b: list[torch.Tensor | None]
    down: list[torch.Tensor]
    down_b: list[torch.Tensor | None]
    mode: int
    eps: float


class CppDecode:
    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.steps = 0  # decode steps run through C++ (tests check the path is taken)

    def plan(self) -> DecodePlan | None:
        """The tensors of every layer, or None when some part of the model is not what the C++ loop computes."""
        m = self.model
        act = m.dtype
        if m.rotary is None or act not in (torch.float32, torch.bfloat16) or m.device.type != "cpu":
            return None
        final = m.model.norm
        if type(final) is not RMSNorm or final.weight.dtype != act or cpu_kernels.load() is None:
            return None
        p = DecodePlan([], [], final.weight, [], [], [], [], [], [], [], [], -1, final.eps)

        def add(proj, weight: torch.Tensor, bias: torch.Tensor | None, sources, ws: list, bs: list) -> bool:
            md = _mode(proj.packed, weight, act)
            if p.mode != md and p.mode != -1:
                return False
            p.mode = md
            ws.append(proj.packed.get(weight, sources) if md in (PACKED, PACKED_FP32) else weight)
            bs.append(bias)
            return True

        for layer in m.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            f, g = attn._fused_qkv, mlp._fused_gate_up
            if not (type(n1) is RMSNorm and type(n2) is RMSNorm and n1.eps == n2.eps == p.eps
                    and n1.weight.dtype == n2.weight.dtype == act and not attn.qk_norm
                    and mlp.gated and mlp.act is F.silu and type(attn.o_proj) is Linear and type(mlp.down_proj) is Linear
                    and type(f) is FusedLinears and type(g) is FusedLinears and f.intact() and g.intact()):
                return None
            o, d = attn.o_proj, mlp.down_proj
            if not (add(f, f.weight, f.bias, tuple(x.weight for x in f.mods), p.qkv, p.qkv_b)
                    and add(o, o.weight, o.bias, (o.weight,), p.o, p.o_b)
                    and add(g, g.weight, g.bias, tuple(x.weight for x in g.mods), p.gu, p.gu_b)
                    and add(d, d.weight, d.bias, (d.weight,), p.down, p.down_b)):
                return None
            p.in_norm.append(n1.weight)
            p.post_norm.append(n2.weight)
        return p

    @torch.no_grad()
    def run(self, p: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
            v_cache: list[torch.Tensor], slots: torch.Tensor, block_tables: torch.Tensor,
            ctx_lens: torch.Tensor) -> torch.Tensor:
        """tokens, positions (S,): one new token per sequence -> final-norm hidden states (S, C)."""
        m, cfg = self.model, self.model.config
        x = m.model.embed_tokens(tokens)  # (S, C)
        cos, sin = m.rotary(positions, x.dtype)  # (S, head_dim) each
        self.steps += 1
        return cpu_kernels.decode_layers(
            x, cos.contiguous(), sin.contiguous(), p.in_norm, p.post_norm, p.final_norm, p.qkv, p.qkv_b, p.o, p.o_b,
            p.gu, p.gu_b, p.down, p.down_b, p.mode, k_cache, v_cache, slots, block_tables, ctx_lens,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, p.eps, cfg.head_dim ** -0.5, cfg.sliding_window or 0)
