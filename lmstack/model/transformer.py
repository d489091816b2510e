"""The decoder: one implementation for every family, configured by ModelConfig flags.

Module names equal HF Llama's (`model.layers.3.self_attn.q_proj`), so `state_dict()` keys are HF
keys and LoRA / quantization can swap `nn.Linear`s by name after build. The model knows nothing of
KV caches: `meta.attend(...)` owns whatever cache layout the caller uses (DESIGN.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack import cpu_kernels
from lmstack.config import ModelConfig
from lmstack.model.attention import attention
from lmstack.model.layers import MLP, FusedLinears, Linear, RMSNorm, make_norm
from lmstack.model.rope import RotaryEmbedding, apply_rope


class SelfAttention(nn.Module):
    FUSABLE = (("_fused_qkv", ("q_proj", "k_proj", "v_proj")),)  # see layers.fuse_projections
    _fused_qkv: FusedLinears | None = None  # or quant.FusedInt8 when q/k/v are int8

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, D, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, meta) -> torch.Tensor:
        B, T, _ = x.shape
        f = self._fused_qkv
        roped = False
        if f is not None and f.active():
            qkv = f.project(x)  # (B, T, (H + 2 Hkv) D)
            if rope is not None and not self.qk_norm and cpu_kernels.fast(qkv, rope[0]):
                # CPU inference: RoPE on the q and k heads in place, one C++ pass
                cpu_kernels.rope_(qkv, *rope, self.n_heads + self.n_kv, self.head_dim)
                roped = True
            q, k, v = qkv.split(f.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and not roped:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if meta is None:
            o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), impl=self.impl,
                          causal=True, window=self.window).transpose(1, 2)  # (B, T, H, D)
        else:
            o = meta.attend(self.layer_idx, q, k, v, self.window)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.act, cfg.gated_mlp, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, rope, meta) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), rope, meta)
        post = self.post_attention_layernorm
        if isinstance(post, RMSNorm) and cpu_kernels.fast(x, a, post.weight):
            x, h = cpu_kernels.add_rms_norm(x, a, post.weight, post.eps)  # CPU inference: one pass
        else:
            x = x + a
            h = post(x)
        return x + self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.pos == "learned":  # GPT-2's absolute position table
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.rotary = (
            RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
            if cfg.pos == "rope" else None
        )
        if cfg.head == "score":
            self.score = Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    # ----------------------------------------------------------------- config
    def set_attention_impl(self, impl: str) -> None:
        for layer in self.model.layers:
            layer.self_attn.impl = impl

    @property
    def dtype(self) -> torch.dtype:
        emb = self.model.embed_tokens  # an NF4Embedding (QLoRA) has codes, and computes in compute_dtype
        return emb.compute_dtype if hasattr(emb, "compute_dtype") else emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def init_weights(self, std: float | None = None) -> None:
        """Pretraining init: N(0, initializer_range) for matrices, zero biases, unit norms; output
        projections scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream does not grow with depth."""
        std = std if std is not None else self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = std / (2 * self.config.num_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        # LayerNorm biases are named "bias" and already zero; LayerNorm/RMSNorm weights are ones.

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta=None) -> torch.Tensor:
        """tokens, positions (B, T) int64 -> hidden (B, T, D) after the final norm.

        meta=None: dense causal attention within each row. Otherwise meta.attend(...) (paged or
        contiguous KV cache, padding masks) is called by every layer.
        """
        if tokens.dim() == 1:
            tokens, positions = tokens[None], positions[None]
        x = self.model.embed_tokens(tokens)
        if self.rotary is not None:
            rope = self.rotary(positions, x.dtype)
        else:
            rope = None
            if int(positions.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(positions.max())} is beyond max_position_embeddings "
                    f"{self.config.max_position_embeddings}"
                )
            x = x + self.model.embed_positions(positions)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if ckpt:
                x = checkpoint(layer, x, rope, meta, use_reentrant=False)
            else:
                x = layer(x, rope, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, V). Call on the rows you need: full-vocab logits for every position are big."""
        return self.lm_head(hidden)

    def compute_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Sequence-classification head (reward models): (…, D) -> (…, num_labels)."""
        return self.score(hidden)
