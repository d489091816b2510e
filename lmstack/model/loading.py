"""Checkpoint I/O by Hugging Face parameter names: safetensors in (single or sharded), safetensors out.

Reading (lmstack/checkpoint/safetensors_io.py) is memory-mapped and validated from the headers
before anything is allocated; each tensor is copied once into its parameter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from lmstack.checkpoint.memory import check_fits_in_memory
from lmstack.checkpoint.safetensors_io import CheckpointError, checkpoint_files, iter_safetensors, read_safetensors_header
from lmstack.config import ConfigError, ModelConfig, read_json_object
from lmstack.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return DTYPES.get(cfg.torch_dtype if cfg else "float32", torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


# ----------------------------------------------------------------------- HF name <-> lmstack name
def _gpt2_to_canonical(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """GPT-2 stores Conv1D weights as (in, out) and fuses q|k|v; lmstack uses Llama names and Linear."""
    name = name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return []  # causal-mask buffers in old checkpoints
    simple = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
              "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias", "lm_head.weight": "lm_head.weight"}
    if name in simple:
        return [(simple[name], t)]
    parts = name.split(".")  # h.{i}.{module...}
    if parts[0] != "h":
        return [(name, t)]
    i, rest = parts[1], ".".join(parts[2:])
    pre = f"model.layers.{i}."
    ln = {"ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
          "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias"}
    if rest in ln:
        return [(pre + ln[rest], t)]
    conv = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    mod, kind = rest.rsplit(".", 1)
    if mod in conv:
        return [(pre + conv[mod] + "." + kind, t.t() if kind == "weight" else t)]
    if mod == "attn.c_attn":
        w = t.t() if kind == "weight" else t  # (3D, D) or (3D,)
        q, k, v = w.chunk(3, dim=0)
        return [(pre + f"self_attn.{p}_proj.{kind}", x) for p, x in zip("qkv", (q, k, v))]
    return [(name, t)]


def _canonical_to_gpt2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    simple = {"model.embed_tokens.weight": "transformer.wte.weight", "model.embed_positions.weight": "transformer.wpe.weight",
              "model.norm.weight": "transformer.ln_f.weight", "model.norm.bias": "transformer.ln_f.bias"}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name in simple:
            out[simple[name]] = t
            continue
        if name == "lm_head.weight":
            out[name] = t
            continue
        parts = name.split(".")
        i, rest = parts[2], ".".join(parts[3:])
        pre = f"transformer.h.{i}."
        ln = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}
        mod, kind = rest.rsplit(".", 1)
        if mod in ln:
            out[pre + ln[mod] + "." + kind] = t
        elif mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(pre + "attn.c_attn." + kind, {})[mod[-6]] = t
        else:
            conv = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
            out[pre + conv[mod] + "." + kind] = t.t().contiguous() if kind == "weight" else t
    for key, d in qkv.items():
        w = torch.cat([d["q"], d["k"], d["v"]], dim=0)
        out[key] = w.t().contiguous() if key.endswith("weight") else w
    return out


def _phi3_to_canonical(cfg: ModelConfig, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Phi-3 stores q|k|v as one `qkv_proj` and gate|up as one `gate_up_proj` (rows in that order)."""
    if name.endswith("self_attn.qkv_proj.weight"):
        pre = name.removesuffix("qkv_proj.weight")
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if t.shape[0] != q + 2 * kv:
            return [(name, t)]  # refused by the caller as unexpected, naming the tensor
        return [(pre + f"{p}_proj.weight", x) for p, x in zip("qkv", t.split([q, kv, kv], dim=0))]
    if name.endswith("mlp.gate_up_proj.weight"):
        pre = name.removesuffix("gate_up_proj.weight")
        if t.shape[0] != 2 * cfg.intermediate_size:
            return [(name, t)]
        gate, up = t.split(cfg.intermediate_size, dim=0)
        return [(pre + "gate_proj.weight", gate), (pre + "up_proj.weight", up)]
    return [(name, t)]


def _canonical_to_phi3(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("self_attn.q_proj.weight"):
            pre = name.removesuffix("q_proj.weight")
            out[pre + "qkv_proj.weight"] = torch.cat([sd[pre + f"{p}_proj.weight"] for p in "qkv"], dim=0)
        elif name.endswith("mlp.gate_proj.weight"):
            pre = name.removesuffix("gate_proj.weight")
            out[pre + "gate_up_proj.weight"] = torch.cat([t, sd[pre + "up_proj.weight"]], dim=0)
        elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            out[name] = t
    return out


def _to_canonical(cfg: ModelConfig, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if cfg.model_type == "gpt2":
        return _gpt2_to_canonical(name, t)
    if cfg.model_type == "phi3":
        return _phi3_to_canonical(cfg, name, t)
    return [(name, t)]


# ------------------------------------------------------------------------------------ load / save
def _checked_pairs(model: Transformer, files: dict[Path, Iterable[tuple[str, torch.Tensor]]]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, checkpoint tensor) for every tensor of `files` by name, refusing unexpected, misshapen
    and (at the end) missing tensors. Run once over meta tensors made from the headers, it checks a
    checkpoint against config.json before anything is allocated."""
    cfg = model.config
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    seen: set[str] = set()
    for f, items in files.items():
        for hf_name, t in items:
            for name, tensor in _to_canonical(cfg, hf_name, t):
                if name == "lm_head.weight" and cfg.tie_embeddings:
                    continue  # some tied checkpoints store a copy; the tied parameter is embed_tokens
                p = params.get(name)
                if p is None:
                    raise CheckpointError(f"{f}: unexpected tensor {hf_name!r} for {cfg.architecture}")
                if tuple(p.shape) != tuple(tensor.shape):
                    raise CheckpointError(
                        f"{f}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)} "
                        f"from config.json"
                    )
                if tensor.dtype == torch.bool and p.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {hf_name!r} has dtype bool, expected a floating-point tensor")
                yield p, tensor
                seen.add(name)
    expected = {n for n, _ in model.named_parameters()}
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{next(iter(files)).parent}: missing tensors ({len(missing)}): {shown}")


def _header_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    return [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in read_safetensors_header(path)[0].items()]


def load_state_dict_into(model: Transformer, files: list[Path], dtype: torch.dtype) -> None:
    """Copies every tensor of `files` into `model` by name, checking names and shapes."""
    with torch.no_grad():
        for p, tensor in _checked_pairs(model, {f: iter_safetensors(f) for f in files}):
            p.copy_(tensor.to(dtype) if p.is_floating_point() else tensor)


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
               config: ModelConfig | None = None) -> Transformer:
    """HF folder -> Transformer in eval mode. `dtype="auto"` keeps the checkpoint's torch_dtype.

    Everything that can be checked without the weights is checked before they are allocated:
    config.json's fields, that the weights fit in memory, and every file's header, tensor names and
    shapes against the config."""
    path = Path(model_dir)
    if path.suffix == ".gguf":
        from lmstack.checkpoint.gguf.load import load_gguf_model

        model, _ = load_gguf_model(path, dtype)
        return model.to(device)
    cfg = config or ModelConfig.from_hf(path)
    qcfg = _quantization_config(path)
    files = checkpoint_files(path)
    headers = {f: _header_tensors(f) for f in files}  # every file's header validated up front
    if qcfg is not None:
        from lmstack.model.quant import load_quantized

        # the quantized tensors are read whole (their size is in the headers); float modules beside them
        stored = sum(t.numel() * t.element_size() for ts in headers.values() for _, t in ts)
        check_fits_in_memory(stored, "cpu", f"{path}: the quantized checkpoint's tensors")
        return load_quantized(path, cfg, resolve_dtype(dtype, cfg), qcfg).to(device).eval()
    dt = resolve_dtype(dtype, cfg)
    check_fits_in_memory(cfg.num_parameters() * dt.itemsize, device,
                         f"{path / 'config.json'}: {cfg.num_parameters():,} parameters in {str(dt).removeprefix('torch.')}")
    with torch.device("meta"):
        model = Transformer(cfg)
    for _ in _checked_pairs(model, headers):  # names and shapes against config.json, nothing allocated yet
        pass
    model = model.to(dt).to_empty(device=device)  # allocated once, in the final dtype
    if model.rotary is not None:  # non-persistent buffer: recompute rather than load
        from lmstack.model.rope import RotaryEmbedding

        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings).to(device)
    if cfg.tie_embeddings and cfg.head == "lm":
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_dict_into(model, files, dt)
    return model.eval()


def _quantization_config(path: Path) -> dict | None:
    p = path / "config.json"
    if not p.is_file():  # a ModelConfig passed in, no config.json: not quantized
        return None
    q = read_json_object(p).get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise ConfigError(f"{p}: quantization_config must be a JSON object, got a JSON {type(q).__name__}")
    return q


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """state_dict under HF names (tied lm_head dropped, GPT-2 renamed and transposed)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if model.config.model_type == "gpt2":
        sd = _canonical_to_gpt2(sd)
    elif model.config.model_type == "phi3":
        sd = _canonical_to_phi3(sd)
    return sd


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning its whole storage. Parameters can be slices of one fused weight
    (layers.FusedLinears) and safetensors refuses tensors that share memory."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3,
               dtype: torch.dtype | None = None) -> None:
    """Writes config.json + model.safetensors (or shards + index) that transformers loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    sd = {k: _standalone((v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu())
          for k, v in sd.items()}
    cfg = model.config
    dt = next(iter(sd.values())).dtype
    cfg = cfg.replace(torch_dtype={torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dt, "float32"))
    cfg.save(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder (HF names), copied into memory."""
    return {k: v.clone() for f in checkpoint_files(model_dir) for k, v in iter_safetensors(f)}

