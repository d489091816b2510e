"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), int4 group-wise.

Salient weight channels are those that see large activations. Scaling input channel k of a linear
by s_k (and its input by 1/s_k, folded into the preceding op) leaves the float output unchanged but
shrinks the relative rounding error of the salient channels. AWQ picks s = mean|x|^alpha per input
channel, grid-searching alpha in [0, 1] to minimise the quantized output error of each group of
linears that share one input (paper eq. 4-5). alpha = 0 is plain RTN, so on the calibration data
the search can only match or beat RTN.

Layer groups (per decoder layer), each with the op that produces their input:
  q/k/v     <- input_layernorm            gate/up   <- post_attention_layernorm
  o         <- v_proj (only without GQA)  down      <- up_proj
Layers are processed in order: the input of layer i+1 is the output of the (rescaled, still float)
layer i, computed on the calibration tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.log import logger, progress
from lmstack.model.quant import QuantError, check_group_size, dequantize_int4, quantize_int4, quantize_model


@dataclass
class AWQConfig:
    group_size: int = 128
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., 1}
    max_search_tokens: int = 4096  # tokens used for each group's error (the scale statistics use all)

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise QuantError(f"AWQConfig.n_grid must be >= 1, got {self.n_grid}")
        if self.max_search_tokens < 1:
            raise QuantError(f"AWQConfig.max_search_tokens must be >= 1, got {self.max_search_tokens}")


def fake_quant_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize (N, K) with the exact int4 RTN used for storage (fp16 scales)."""
    q, s, z = quantize_int4(w, group_size)
    return dequantize_int4(q, s, z, group_size)


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, n_grid: int = 20,
                  x_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float, float]:
    """x (n, K) inputs shared by `weights` [(N_i, K)]. Returns (s (K,), best alpha, best err, RTN err),
    err = mean squared error of the concatenated outputs x W_i^T after int4 quantization of W_i * s."""
    x = x.float()
    w = torch.cat([wi.float() for wi in weights], dim=0)  # (sum N_i, K)
    ref = x @ w.t()
    x_mean = (x.abs().mean(dim=0) if x_mean is None else x_mean.float()).clamp(min=1e-8)  # (K,)
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    rtn_err = float("inf")
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre around 1 so fp16 scales keep their precision
        wq = fake_quant_int4(w * s[None, :], group_size) / s[None, :]
        err = float((x @ wq.t() - ref).pow(2).mean())
        if i == 0:
            rtn_err = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], rtn_err


def _fold_into_prev(prev: nn.Module, s: torch.Tensor) -> None:
    """prev's output is divided by s (per channel): norm weight (and bias) or a linear's rows."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


def _scale_inputs(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def _layer_groups(layer: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear], str]]:
    """(group name, previous op, linears sharing the input, name of the linear whose input we record)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q")]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # with GQA v's rows do not map 1:1 onto o's inputs
        groups.append(("o", attn.v_proj, [attn.o_proj], "o"))
    if getattr(mlp, "gated", False):
        groups.append(("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "gate"))
        groups.append(("down", mlp.up_proj, [mlp.down_proj], "down"))
    else:
        groups.append(("up", layer.post_attention_layernorm, [mlp.up_proj], "up"))
    return groups


def calibration_batches(ids: list[int], n_samples: int, seq_len: int) -> torch.Tensor:
    """Cut a token stream into up to n_samples rows of seq_len tokens: (S, T) int64."""
    if seq_len < 1 or n_samples < 1:
        raise QuantError(f"calibration seq_len and n_samples must be >= 1, got {seq_len} and {n_samples}")
    if len(ids) < seq_len:
        raise QuantError(
            f"calibration text too short: {len(ids)} tokens, AWQ needs at least one sample of {seq_len} tokens "
            f"(give a longer --calib file or a smaller --calib-seq-len)"
        )
    n = min(n_samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


@torch.no_grad()
def apply_awq(model: nn.Module, calib: torch.Tensor, cfg: AWQConfig | None = None) -> dict[str, dict[str, float]]:
    """Rescale the float model in place (output-preserving up to rounding). Returns per-group stats
    {"layers.i.qkv": {"alpha", "err", "rtn_err"}}. Follow with quantize_model(model, "awq", G)."""
    cfg = cfg or AWQConfig()
    if calib.dim() != 2 or calib.numel() == 0:
        raise QuantError(f"calibration tokens must be a non-empty (samples, seq_len) tensor, got {tuple(calib.shape)}")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith(("lm_head", "score")):
            check_group_size(name, m.in_features, cfg.group_size)
    S, T = calib.shape
    positions = torch.arange(T).expand(S, T)
    x = model.model.embed_tokens(calib).float()
    if getattr(model.model, "embed_positions", None) is not None:
        x = x + model.model.embed_positions(positions)
    rope = model.rotary(positions, x.dtype) if model.rotary is not None else None
    stats: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(progress(model.model.layers, desc="awq")):
        groups = _layer_groups(layer)
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for _, _, lins, key in groups:
            def hook(mod, args, key=key):
                captured[key] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hooks.append(lins[0].register_forward_pre_hook(hook))
        try:
            layer(x, rope, None)
        finally:
            for h in hooks:
                h.remove()
        for gname, prev, lins, key in groups:
            xin = captured[key]  # (S*T, K)
            x_mean = xin.abs().mean(dim=0)
            if xin.shape[0] > cfg.max_search_tokens:
                xin = xin[torch.randperm(xin.shape[0], generator=gen)[: cfg.max_search_tokens]]
            s, alpha, err, rtn = search_scales(xin, [lin.weight for lin in lins], cfg.group_size, cfg.n_grid, x_mean)
            _fold_into_prev(prev, s)
            _scale_inputs(lins, s)
            stats[f"layers.{i}.{gname}"] = {"alpha": alpha, "err": err, "rtn_err": rtn}
        x = layer(x, rope, None)  # input of the next layer, through the rescaled float layer
    logger.info("awq: mean alpha %.2f over %d groups", sum(v["alpha"] for v in stats.values()) / max(len(stats), 1),
                len(stats))
    return stats


def awq_quantize(model: nn.Module, calib: torch.Tensor, group_size: int = 128,
                 skip: tuple[str, ...] = ("lm_head",), n_grid: int = 20) -> nn.Module:
    """apply_awq + int4 swap: the model comes back with Int4Linear modules (quant_method 'awq')."""
    dtype = model.dtype if hasattr(model, "dtype") else torch.float32
    model.float()  # search and folding in fp32
    apply_awq(model, calib, AWQConfig(group_size=group_size, n_grid=n_grid))
    model.to(dtype)
    return quantize_model(model, "awq", group_size, skip)
