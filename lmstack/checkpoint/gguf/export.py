"""HF folder (llama / qwen2 / qwen3) or GGUF file -> a GGUF file llama.cpp loads.

Writes what llama.cpp's converter and quantizer write: GGUF tensor names, `{arch}.*` hyperparameters,
the tokenizer (tokens, types, merges or scores, the pre-tokenizer name llama.cpp uses for that split,
special ids, chat template), and each tensor in the type llama-quantize would give it for the file
type (quants.tensor_type). Re-exporting a GGUF file keeps its tokenizer, its name and the tensors
already in their target type as they are, so a file exported again in its own type comes out
byte-identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.checkpoint.gguf.fields import field
from lmstack.checkpoint.gguf.hparams import rope_type, write_hparams
from lmstack.checkpoint.gguf.names import ARCHS, ROPE_FREQS, hf_to_gguf_name, needs_qk_permutation, permute_qk
from lmstack.checkpoint.gguf.quants import EXPORT_TYPES, file_type, quantize, tensor_type
from lmstack.checkpoint.gguf.tokenizer_kv import tokenizer_kv_from_folder, tokenizer_kv_from_gguf
from lmstack.config import ModelConfig
from lmstack.model.rope import default_inv_freq


def _from_folder(model_dir: Path):
    from lmstack.model.loading import load_model

    cfg = ModelConfig.from_hf(model_dir)
    _check_exportable(cfg, model_dir)
    tok = tokenizer_kv_from_folder(model_dir, cfg.vocab_size)
    tok.bos = tok.bos if tok.bos is not None else cfg.bos_token_id
    tok.eos = tok.eos if tok.eos is not None else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    tok.pad = tok.pad if tok.pad is not None else cfg.pad_token_id
    model = load_model(model_dir, dtype=torch.float32)
    rope_freqs = None
    if rope_type(cfg) == "llama3":
        # Llama 3.1 scaling travels as per-frequency divisors (llama.cpp's rope_freqs tensor): the
        # ratio of the unscaled to the scaled inverse frequencies lmstack's rotary already computes
        rope_freqs = default_inv_freq(cfg.head_dim, cfg.rope_theta) / model.rotary.inv_freq
    return cfg, model, tok, model_dir.name, rope_freqs, {}


def _from_gguf(path: Path):
    from lmstack.checkpoint.gguf.load import build_model, load_gguf
    from lmstack.checkpoint.gguf.quants import dequantize
    from lmstack.checkpoint.gguf.reader import open_gguf

    reader = open_gguf(path)
    cfg, sd, _ = load_gguf(path, with_tokenizer=False)
    _check_exportable(cfg, path)
    tensors = {t.name: t for t in reader.tensors}
    rope = tensors.get(ROPE_FREQS)
    return (cfg, build_model(cfg, sd, torch.float32), tokenizer_kv_from_gguf(reader, path),
            field(reader, "general.name", path.stem), None if rope is None else dequantize(rope, str(path)), tensors)


def _check_exportable(cfg: ModelConfig, source: Path) -> None:
    if cfg.model_type not in ARCHS or cfg.head != "lm":
        raise GGUFError(f"{source}: architecture {cfg.architecture!r} cannot be exported to GGUF; "
                        f"supported: {[ModelConfig(model_type=a).architecture for a in ARCHS]}")
    kind = rope_type(cfg)
    if kind not in (None, "default", "linear") and not (kind == "llama3" and cfg.model_type == "llama"):
        raise GGUFError(f"{source}: rope_scaling {cfg.rope_scaling} is not supported by the GGUF exporter "
                        "(supported: none, linear, and llama3 for llama models)")


def export_gguf(source: str | Path, out_file: str | Path, type: str = "f16") -> Path:  # noqa: A002
    """HF folder or GGUF file -> a GGUF file of tensor type `type` (EXPORT_TYPES). Returns its path."""
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    if type not in EXPORT_TYPES:
        raise GGUFError(f"GGUF export type {type!r} is not supported; choose one of {list(EXPORT_TYPES)}")
    source, out_file = Path(source), Path(out_file)
    if source.suffix == ".gguf":
        if source.resolve() == out_file.resolve():
            raise GGUFError(f"--out {out_file} must differ from the source file")
        cfg, model, tok, name, rope_freqs, source_tensors = _from_gguf(source)
    else:
        cfg, model, tok, name, rope_freqs, source_tensors = _from_folder(source)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_file), cfg.model_type)
    w.add_name(name)
    w.add_file_type(file_type(type))
    write_hparams(w, cfg)
    tok.write(w)
    tensors = [(hf_to_gguf_name(k), k, v) for k, v in sd.items()]
    if rope_freqs is not None:
        tensors.append((ROPE_FREQS, ROPE_FREQS, rope_freqs))
    for gname, hf_name, t in tensors:
        if gname is None:
            raise GGUFError(f"{source}: tensor {hf_name!r} has no GGUF name")
        t = t.detach().float()
        which = needs_qk_permutation(cfg.model_type, hf_name)
        if which:
            t = permute_qk(t, cfg.num_heads if which == "q" else cfg.num_kv_heads)
        qt = tensor_type(gname, tuple(t.shape), type, cfg.tie_embeddings, cfg.num_layers)
        src = source_tensors.get(gname)
        if src is not None and Q(src.tensor_type) == qt:
            # already in the target type: copied as is, as llama-quantize does (re-quantizing a K-quant
            # would move it), so re-exporting a file in its own type gives the same bytes
            a = np.asarray(src.data)
        elif t.dim() > 1:
            a = quantize(t.contiguous().numpy(), qt)
        else:
            a = t.numpy().astype(np.float32)
        w.add_tensor(gname, a, raw_dtype=qt if qt not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file
