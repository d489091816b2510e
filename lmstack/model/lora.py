"""LoRA (Hu et al. 2021): y = base(x) + (alpha / r) * B A dropout(x), swapped in after the model is built.

The model file knows nothing of LoRA (DESIGN.md): `apply_lora` replaces Linear-like modules by name,
`merge_lora` folds the update back into plain `nn.Linear` weights, and `save_adapter` / `load_adapter`
use PEFT's on-disk format so adapters move freely between lmstack and PEFT.

rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead of alpha / r so that the update's
magnitude does not shrink as the rank grows.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lmstack.checkpoint.safetensors_io import load_safetensors
from lmstack.config import ConfigError, check_value, read_json_object
from lmstack.log import logger
from lmstack.model.layers import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Output heads are never adapted by "all-linear" (PEFT excludes the output layer the same way).
_HEAD_NAMES = ("lm_head", "score")


@dataclass
class LoraSpec:
    """What to adapt and how. `target_modules`: name suffixes (e.g. ["q_proj", "v_proj"]) or "all-linear"."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        elif list(self.target_modules) == ["all-linear"]:
            self.target_modules = "all-linear"
        elif not self.target_modules:
            raise ConfigError("lora.target_modules is empty; give module names (e.g. [q_proj, v_proj]) or 'all-linear'")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class _FrozenDequantLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen quantized base that can `dequantize(dtype)` (QLoRA's NF4).

    Calling the base directly would make autograd keep each layer's dense dequantized weight alive
    until backward (a 16-bit copy of the whole model: what NF4 storage was meant to avoid). Here
    nothing is saved; backward dequantizes again for grad_x = grad_y W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        cd = getattr(base, "compute_dtype", x.dtype)
        bias = getattr(base, "bias", None)
        y = F.linear(x.to(cd), base.dequantize(cd), None if bias is None else bias.to(cd))
        ctx.base, ctx.cd, ctx.x_dtype = base, cd, x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.base.dequantize(ctx.cd)  # (out, in)
        return (grad_y.to(ctx.cd) @ w).to(ctx.x_dtype), None


class LoRALinear(nn.Module):
    """Wraps any Linear-like `base` (nn.Linear, a quantized linear, ...): only `base(x)` and
    `in_features` / `out_features` are required. The base stays frozen; A and B train."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapter weights in fp32 whatever the base's dtype (16-bit or quantized), as PEFT does by default
        # (autocast_adapter_dtype): AdamW updates of small adapter weights are lost to bf16 rounding.
        # Under autocast the matmuls still run in bf16.
        dtype = torch.float32
        device = next((t.device for t in list(base.parameters()) + list(base.buffers())), torch.device("cpu"))
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # Same init as the paper / PEFT: A random (Kaiming-uniform), B zero -> the adapter starts as a no-op.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self._quantized_base = not isinstance(base, nn.Linear) and hasattr(base, "dequantize")

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B @ A, shape (out_features, in_features)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantized_base and x.requires_grad and torch.is_grad_enabled():
            y = _FrozenDequantLinear.apply(x, self.base)
        else:
            y = self.base(x)
        a_dtype = self.lora_A.weight.dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        # Under autocast the matmuls run in the autocast dtype anyway; outside it, match the adapter dtype.
        h = self.lora_A(self.dropout(x if autocast else x.to(a_dtype)))  # (..., r)
        # y + s * h B^T computed as addmm(y, h, (s B)^T): the scale multiplies the small (out, r)
        # matrix instead of the (tokens, out) update, and the add happens inside the matmul. Measured
        # 16.5 -> 13.6 ms forward + backward for a 4096-token, 576 -> 1536 bf16 projection (r 16).
        # Only when one dtype covers all three (autocast, or a base in the adapter dtype): otherwise
        # the update is computed in the adapter dtype and cast, as before.
        if (autocast or y.dtype == a_dtype) and y.dim() >= 2 and y.shape[-1] == self.out_features:
            wb = (self.lora_B.weight * self.scaling).t()  # (r, out)
            out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), wb)
            return out.view(y.shape)
        upd = self.lora_B(h) * self.scaling
        return y + upd.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, LoRALinear):
        return False
    return isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))


def linear_module_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every Linear-like module that is not inside a LoRA wrapper."""
    out = []
    lora_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in model.named_modules():
        if name and _is_linear_like(m) and not any(name.startswith(p) for p in lora_prefixes):
            out.append(name)
    return out


def _matches(name: str, targets: list[str] | str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if targets == "all-linear":
        return leaf not in _HEAD_NAMES
    # A target matches the module's last name component or a dotted suffix (PEFT's rule).
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def apply_lora(model: nn.Module, spec: LoraSpec, freeze_base: bool = True) -> list[str]:
    """Replace every matching Linear-like module by a LoRALinear; freeze everything else.

    Returns the adapted module names. A target list that matches nothing raises ConfigError listing
    the available Linear module names.
    """
    candidates = linear_module_names(model)
    chosen = [n for n in candidates if _matches(n, spec.target_modules)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            f"lora.target_modules {spec.target_modules!r} matches no module; available Linear module names: {leaves}"
        )
    if spec.target_modules != "all-linear":
        for t in spec.target_modules:
            if not any(_matches(n, [t]) for n in candidates):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
                raise ConfigError(f"lora.target_modules entry {t!r} matches no module; available: {leaves}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, spec.r, spec.alpha, spec.dropout, spec.use_rslora))
    model.lora_spec = spec  # type: ignore[attr-defined]  # remembered for save_adapter
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _dense_base(base: nn.Module, dtype: torch.dtype | None) -> nn.Linear:
    """An nn.Linear equal to `base`: itself for nn.Linear, else a dequantized copy (QLoRA -> 16-bit)."""
    if isinstance(base, nn.Linear):
        return base
    if not hasattr(base, "dequantize"):
        raise TypeError(f"cannot merge LoRA into {type(base).__name__}: it has no dequantize() method")
    w = base.dequantize()
    out_dtype = dtype or torch.bfloat16
    bias = getattr(base, "bias", None)
    lin = Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=out_dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(out_dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(out_dtype))
    return lin


@torch.no_grad()
def merge_lora(model: nn.Module, dequant_dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B A) and unwrap the LoRALinear.

    Quantized bases are dequantized to `dequant_dtype` (default bf16) first, as QLoRA export requires.
    """
    for name, m in lora_modules(model).items():
        base = _dense_base(m.base, dequant_dtype)
        delta = m.delta_weight().to(torch.float32)
        base.weight.copy_((base.weight.to(torch.float32) + delta).to(base.weight.dtype))
        _set_module(model, name, base)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names: base_model.model.<module path>.lora_{A,B}.weight."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return sd


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "",
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) into `out_dir`."""
    spec: LoraSpec | None = getattr(model, "lora_spec", None)
    mods = lora_modules(model)
    if spec is None or not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    if mtype in ("gpt2", "phi3"):
        # HF GPT-2 fuses q|k|v into one Conv1D (c_attn), Phi-3 into qkv_proj and gate|up into gate_up_proj;
        # lmstack's split Linear names do not exist there.
        logger.warning("%s adapter saved under lmstack module names: lmstack loads and merges it "
                       "(lmstack export), PEFT on transformers' model cannot", mtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = adapter_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file({k: v.cpu() for k, v in sd.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # PEFT stores the resolved target set (leaf names), even when the user asked for "all-linear".
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> LoraSpec:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: adapter_config.json is missing (not a PEFT adapter folder)")
    d = read_json_object(path)
    check_value(f"{path}: r", d.get("r"), int, lo=1)
    for key in ("lora_alpha", "lora_dropout"):
        if d.get(key) is not None:
            check_value(f"{path}: {key}", d[key], float)
    if d.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    if d.get("use_dora"):
        raise ConfigError(f"{path}: DoRA adapters are not supported")
    targets = d.get("target_modules") or "all-linear"
    return LoraSpec(r=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])), dropout=float(d.get("lora_dropout", 0.0)),
                    target_modules=targets, use_rslora=bool(d.get("use_rslora", False)))


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the adapter described by a PEFT folder to `model` (wrapping modules if needed) and load it."""
    spec = read_adapter_config(adapter_dir)
    if not lora_modules(model):
        apply_lora(model, spec)
    wpath = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise ConfigError(f"{wpath}: adapter weights are missing")
    sd = load_safetensors(wpath)
    mods = lora_modules(model)
    seen = set()
    for key, t in sd.items():
        # PEFT keys: base_model.model.<path>.lora_A.weight (older files may carry an adapter name: .lora_A.default.weight)
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        k = k.replace(".default.weight", ".weight")
        path, _, which = k.rpartition(".lora_")
        which = which.split(".")[0]  # "A" or "B"
        if path not in mods or which not in ("A", "B"):
            raise ConfigError(f"{wpath}: tensor {key!r} does not match any LoRA module of the model")
        lin = mods[path].lora_A if which == "A" else mods[path].lora_B
        if lin.weight.shape != t.shape:
            raise ConfigError(f"{wpath}: {key} has shape {tuple(t.shape)}, the model expects {tuple(lin.weight.shape)}")
        lin.weight.copy_(t.to(lin.weight.dtype))
        seen.add((path, which))
    missing = [f"{p}.lora_{w}" for p in mods for w in ("A", "B") if (p, w) not in seen]
    if missing:
        raise ConfigError(f"{wpath}: missing adapter tensors for {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return model


def trainable_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
