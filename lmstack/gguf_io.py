"""GGUF export and import (llama.cpp / Ollama interop), built on the `gguf` package.

Export writes what llama.cpp's own converter writes for llama / qwen2 / qwen3: GGUF tensor names,
hyperparameters under `{arch}.*`, and the tokenizer (gpt2-style byte-level BPE: tokens, token
types, merges, pre-tokenizer name, special ids, chat template). Import reads such files (ours or
anyone's), dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K to float, undoes the llama q/k permutation
and rebuilds a `tokenizers` tokenizer folder, so `LLM("x.gguf")` runs in lmstack.

Layout facts (from llama.cpp's convert_hf_to_gguf.py): the llama architecture uses GPT-J style
"interleaved" RoPE, so q/k rows are permuted from HF's half-split order with
w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2); qwen2/qwen3 use NEOX RoPE (HF
order, no permutation). 1-D tensors (norms, biases) stay F32. A tied lm_head is simply omitted
(llama.cpp falls back to token_embd).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.config import ConfigError, ModelConfig
from lmstack.log import logger
from lmstack.model.rope import default_inv_freq, llama3_inv_freq

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHS = ("llama", "qwen2", "qwen3")

# HF module suffix -> GGUF tensor base name (per layer under blk.{i}.)
_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# Pre-tokenizer regexes of the BPE families llama.cpp names (public tokenizer.json facts).
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_PRE_REGEX = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "qwen2": _QWEN2_RE}


class GGUFError(ConfigError):
    """A GGUF file or export request lmstack cannot handle; the message names the value."""


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover
        raise GGUFError("GGUF support needs the `gguf` package: pip install gguf") from e
    return gguf


# ------------------------------------------------------------------------------------- names
def hf_to_gguf_name(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (None for non-weights)."""
    mod, _, kind = name.rpartition(".")
    if mod in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[mod]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", mod)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{kind}"
    return None


def gguf_to_hf_name(name: str) -> str | None:
    base, _, kind = name.rpartition(".")
    for hf, g in _GLOBAL_MAP.items():
        if base == g:
            return f"{hf}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", base)
    if m:
        for hf, g in _LAYER_MAP.items():
            if m.group(2) == g:
                return f"model.layers.{m.group(1)}.{hf}.{kind}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF half-split rotary rows -> llama.cpp interleaved rows (llama arch only). w: (rows, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


ROPE_FREQS = "rope_freqs.weight"


def fit_llama3_scaling(factors: torch.Tensor, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    """llama.cpp's per-frequency rope divisors -> HF's `rope_scaling` {"rope_type": "llama3", ...}.

    Llama 3.1 divides each inverse frequency by 1 (wavelength < L / high), by `factor` (wavelength >
    L / low), or by 1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low) in
    between. Only the ratios L : low : high matter, so low = 1 is fixed and L, high are solved from the
    band's divisors (least squares; with fewer than two band points high = 4, Meta's value). The fit
    is accepted only if it reproduces every divisor."""
    inv = default_inv_freq(head_dim, theta)
    if factors.shape != inv.shape:
        raise GGUFError(f"{source}: {ROPE_FREQS} has {factors.numel()} values, expected head_dim / 2 = {inv.numel()}")
    f = factors.double()
    wavelen = (2 * math.pi / inv).double()
    factor = float(f.max())
    band = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    s = (1 / f[band] - 1 / factor) / (1 - 1 / factor)  # blend weight of each band frequency
    if int(band.sum()) >= 2:  # L / wavelen - s * high = 1 - s
        A = torch.stack([1 / wavelen[band], -s], dim=1)
        L, high = torch.linalg.lstsq(A, (1 - s)[:, None]).solution.squeeze(1).tolist()
    elif int(band.sum()) == 1:
        high = 4.0
        L = float(wavelen[band][0] * (1 + (high - 1) * s[0]))
    else:  # a step: put L between the longest kept and the shortest divided wavelength
        high = 4.0
        kept, divided = wavelen[f <= 1 + 1e-4], wavelen[f >= factor * (1 - 1e-4)]
        lo_b = float(kept.max()) * high if kept.numel() else 0.0
        hi_b = float(divided.min()) if divided.numel() else float("inf")
        L = math.sqrt(lo_b * hi_b) if 0 < lo_b < hi_b < float("inf") else max(lo_b * 1.01, 1.0)
    if abs(L - round(L)) < 1e-3 * L:  # checkpoints state a whole number of tokens (Meta: 8192)
        L = round(L)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
               "original_max_position_embeddings": L}
    if not (high > 1 and L > 0) or not torch.allclose(inv / llama3_inv_freq(inv, scaling), factors.float(),
                                                      rtol=1e-3, atol=0):
        raise GGUFError(f"{source}: {ROPE_FREQS} does not follow Llama 3.1's rope scaling; lmstack cannot "
                        "represent these per-frequency factors")
    return scaling


# -------------------------------------------------------------------------------- tokenizer out
def _pre_name(tok_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json (by its split regex)."""
    pre = tok_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for it in items:
        if it.get("type") == "Split":
            rx = (it.get("pattern") or {}).get("Regex", "")
            if rx == _LLAMA3_RE:
                return "llama-bpe"
            if rx == _QWEN2_RE:
                return "qwen2"
    if len(items) == 1 and items[0].get("type") == "ByteLevel" and items[0].get("use_regex", True):
        return "gpt-2"
    logger.warning("gguf export: pre-tokenizer %s has no llama.cpp name; writing 'default' "
                   "(llama.cpp may split text differently; token ids are unaffected)",
                   [i.get("type") for i in items])
    return "default"


def _tokenizer_kv(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    gguf = _gguf()
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise GGUFError(f"{model_dir}: tokenizer.json is missing; GGUF export embeds the tokenizer")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{tj_path}: tokenizer model {model.get('type')!r} is not supported for GGUF export "
                        "(only BPE: byte-level, llama.cpp's 'gpt2', or SentencePiece-style, its 'llama')")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise GGUFError(f"{tj_path}: tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}")
    spm = _sentencepiece_style(tj)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.BYTE if spm and _BYTE_TOKEN.fullmatch(tok) else gguf.TokenType.NORMAL)
    if spm and model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = int(gguf.TokenType.UNKNOWN)
    for i, t in added.items():
        if types[i] != int(gguf.TokenType.UNKNOWN):
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFError(f"{tj_path}: the BPE tokenizer has no merges; llama.cpp refuses a 'gpt2' vocabulary "
                        "without tokenizer.ggml.merges")
    scores = None
    if spm:
        # llama.cpp's SentencePiece tokenizer joins the adjacent pair whose concatenation scores highest:
        # a token's score is minus the rank of the first merge that makes it (characters, which no merge
        # makes, and unreachable pieces come after every merge)
        made: dict[str, int] = {}
        for r, m in enumerate(merges):
            made.setdefault(m.replace(" ", ""), r)
        scores = [-float(made.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    cfg = {}
    if (model_dir / "tokenizer_config.json").is_file():
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    def tid(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    from tokenizers import Tokenizer as HFTok

    backend = HFTok.from_file(str(tj_path))
    bos = tid("bos_token")
    probe = backend.encode("a", add_special_tokens=True).ids
    add_bos = bool(bos is not None and probe and probe[0] == bos)
    # chat models end a turn with a second id (generation_config.json): llama.cpp's end-of-turn token
    gen_eos: list[int] = []
    if (model_dir / "generation_config.json").is_file():
        g = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        gen_eos = [int(i) for i in ([g] if isinstance(g, int) else list(g or []))]
    eos = tid("eos_token")
    eot = next((i for i in gen_eos if i != eos), None)
    template = cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return {"tokens": tokens, "types": types, "merges": merges, "bos": bos, "eos": eos, "eot": eot,
            "pad": tid("pad_token"), "add_bos": add_bos, "template": template, "scores": scores,
            "unk": vocab.get(model.get("unk_token")) if spm else None,
            "pre": None if spm else _pre_name(tj), "space_prefix": spm == "prefix"}


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _sentencepiece_style(tj: dict) -> str | None:
    """'prefix' / 'plain' for a SentencePiece-style BPE tokenizer.json (Llama 2, Mistral, TinyLlama:
    byte fallback, spaces as U+2581, with or without a prepended one), None for byte-level BPE."""
    if not tj.get("model", {}).get("byte_fallback"):
        return None
    pre = tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    meta = next((p for p in pres if p.get("type") == "Metaspace"), None)
    if meta is not None:
        return "plain" if meta.get("prepend_scheme", "always") == "never" or meta.get("add_prefix_space") is False \
            else "prefix"
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(x.get("type") == "Replace" and x.get("content") == "\u2581" for x in norms):
        return "prefix" if any(x.get("type") == "Prepend" and x.get("prepend") == "\u2581" for x in norms) else "plain"
    return None


# ----------------------------------------------------------------------------------- export
def _tensor_type(name: str, t: torch.Tensor, out_type: str):
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if t.dim() == 1 or out_type == "f32":
        return Q.F32
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[out_type]
    if want in (Q.Q8_0, Q.Q4_0) and t.shape[-1] % 32:
        logger.warning("gguf export: %s has row length %d (not a multiple of 32): stored as F16", name, t.shape[-1])
        return Q.F16
    return want


def export_gguf(model_dir: str | Path, out_file: str | Path, type: str = "f16") -> Path:  # noqa: A002
    """HF folder (llama / qwen2 / qwen3) -> a GGUF file llama.cpp loads. Returns the path."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if type not in EXPORT_TYPES:
        raise GGUFError(f"GGUF export type {type!r} is not supported; choose one of {list(EXPORT_TYPES)}")
    from lmstack.model.loading import load_model

    model_dir = Path(model_dir)
    cfg = ModelConfig.from_hf(model_dir)
    arch = cfg.model_type
    if arch not in ARCHS or cfg.head != "lm":
        raise GGUFError(f"{model_dir}: architecture {cfg.architecture!r} cannot be exported to GGUF; "
                        f"supported: {[ModelConfig(model_type=a).architecture for a in ARCHS]}")
    rope_type = None if cfg.rope_scaling is None else cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
    if rope_type not in (None, "default", "linear") and not (rope_type == "llama3" and arch == "llama"):
        raise GGUFError(f"{model_dir}: rope_scaling {cfg.rope_scaling} is not supported by the GGUF exporter "
                        "(supported: none, linear, and llama3 for llama models)")
    tok = _tokenizer_kv(model_dir, cfg.vocab_size)
    model = load_model(model_dir, dtype=torch.float32)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if rope_type == "llama3":
        # Llama 3.1 scaling travels as per-frequency divisors (llama.cpp's rope_freqs tensor): the
        # ratio of the unscaled to the scaled inverse frequencies lmstack's rotary already computes
        sd[ROPE_FREQS] = default_inv_freq(cfg.head_dim, cfg.rope_theta) / model.rotary.inv_freq

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_name(model_dir.name)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    w.add_file_type(int(ftype))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    # tokenizer
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["scores"] is None:  # byte-level BPE
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_merges(tok["merges"])
    else:  # SentencePiece BPE: scores rank the pairs, no merge list
        w.add_tokenizer_model("llama")
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(tok["space_prefix"])
        if tok["unk"] is not None:
            w.add_unk_token_id(int(tok["unk"]))
    bos = tok["bos"] if tok["bos"] is not None else cfg.bos_token_id
    eos = tok["eos"] if tok["eos"] is not None else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    pad = tok["pad"] if tok["pad"] is not None else cfg.pad_token_id
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if pad is not None:
        w.add_pad_token_id(int(pad))
    if tok["eot"] is not None:
        w.add_eot_token_id(int(tok["eot"]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    if tok["template"]:
        w.add_chat_template(tok["template"])
    # tensors
    for name, t in sd.items():
        gname = ROPE_FREQS if name == ROPE_FREQS else hf_to_gguf_name(name)
        if gname is None:
            raise GGUFError(f"{model_dir}: tensor {name!r} has no GGUF name")
        t = t.detach().float()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, cfg.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, cfg.num_kv_heads)
        qt = _tensor_type(name, t, type)
        a = t.contiguous().numpy()
        if qt == Q.F32:
            w.add_tensor(gname, a.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


# ----------------------------------------------------------------------------------- import
_DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _dequant(t) -> torch.Tensor:
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType(t.tensor_type)
    if qt.name not in _DEQUANT_TYPES:
        raise GGUFError(f"GGUF tensor {t.name!r} has type {qt.name}, which lmstack cannot dequantize; "
                        f"supported: {list(_DEQUANT_TYPES)}")
    shape = tuple(int(d) for d in reversed(list(t.shape)))  # GGML lists dims fastest-first
    if qt == gguf.GGMLQuantizationType.F32:
        a = np.asarray(t.data, dtype=np.float32)
    elif qt == gguf.GGMLQuantizationType.F16:
        a = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        a = gguf.quants.dequantize(np.asarray(t.data), qt)
    return torch.from_numpy(np.ascontiguousarray(a).reshape(shape).copy())


def _config_from_gguf(reader, path: Path, names: set[str]) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {list(ARCHS)}")

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: required GGUF key {arch}.{key} is missing")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv = _field(reader, f"{arch}.attention.head_count_kv", heads)
    n_vocab = _field(reader, f"{arch}.vocab_size")
    if n_vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        n_vocab = len(tokens.data) if tokens is not None else None
    if n_vocab is None:
        raise GGUFError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size or tokenizer.ggml.tokens)")
    rope_scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {_field(reader, f'{arch}.rope.scaling.type')!r} is not supported")
    if ROPE_FREQS in names:
        if rope_scaling is not None or arch != "llama":
            raise GGUFError(f"{path}: per-frequency rope factors ({ROPE_FREQS}) are supported only for llama "
                            "models without another rope scaling")
        head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or 0) or hidden // heads
        t = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        rope_scaling = fit_llama3_scaling(_dequant(t).float(), head_dim,
                                          float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), str(path))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=arch, vocab_size=int(n_vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(kv), head_dim=int(_field(reader, f"{arch}.attention.key_length", 0) or 0),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=eos,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _byte_level_bpe(reader, path: Path, tokens: list[str]):
    """llama.cpp's 'gpt2' tokenizer: byte-level BPE with explicit merges and a split regex."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    merges = _field(reader, "tokenizer.ggml.merges") or []
    # HF keeps added tokens in the model vocab too, so each keeps its GGUF id
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTok(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in _PRE_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("gpt-2", "default"):
            logger.warning("%s: pre-tokenizer %r is not known to lmstack; using GPT-2's split", path, pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader, path: Path, tokens: list[str], types: list[int]):
    """llama.cpp's 'llama' tokenizer (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama ...) as a
    `tokenizers` BPE that segments text the same way.

    llama.cpp starts from the UTF-8 characters of the text (spaces written as U+2581, one prepended
    when add_space_prefix) and repeatedly joins the adjacent pair whose concatenation is a vocabulary
    token with the highest score (leftmost on ties); characters it never joins into a token become
    <0xNN> byte tokens. A BPE whose merge list holds every split (a, b) of every normal token, ranked
    by that token's score, takes the same steps; byte_fallback gives the byte tokens."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTok

    gguf = _gguf()
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{path}: a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores for each of its "
                        f"{len(tokens)} tokens; found {None if scores is None else len(scores)}")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.USER_DEFINED))
    ranked = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if int(ty) in mergeable:
            ranked += [(-float(scores[i]), i, t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    ranked.sort()
    unk_id = next((i for i, ty in enumerate(types) if int(ty) == int(gguf.TokenType.UNKNOWN)), None)
    tok = HFTok(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], byte_fallback=True,
                           unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _write_tokenizer(reader, path: Path, out_dir: Path) -> None:
    """tokenizer.ggml.* -> tokenizer.json + tokenizer_config.json (byte-level or SentencePiece BPE)."""
    from tokenizers import AddedToken, processors

    gguf = _gguf()
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                        "'llama' SentencePiece BPE); load the weights with load_gguf(..., with_tokenizer=False) "
                        "and pass a tokenizer folder")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    tok = _byte_level_bpe(reader, path, tokens) if kind == "gpt2" else _sentencepiece_bpe(reader, path, tokens, types)
    # UNUSED: vocabulary padding rows ([PAD300] ...) -- special, so decoding skips them like the HF folder does
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED),
               int(gguf.TokenType.UNKNOWN)}
    added = []
    for i, t in enumerate(tokens):
        ty = int(types[i])
        if ty in special:
            added.append((i, AddedToken(t, special=ty != int(gguf.TokenType.USER_DEFINED), normalized=False)))
    for _, a in added:
        if a.special:
            tok.add_special_tokens([a])
        else:
            tok.add_tokens([a])
    for i, a in added:
        if tok.token_to_id(a.content) != i:
            raise GGUFError(f"{path}: token {a.content!r} should have id {i} but got {tok.token_to_id(a.content)} "
                            "when rebuilding the tokenizer")

    def name(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id"), name(
        "tokenizer.ggml.padding_token_id")
    # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level ones do not
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
           "add_bos_token": add_bos, "clean_up_tokenization_spaces": False}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    eos_ids = [int(i) for i in (_field(reader, "tokenizer.ggml.eos_token_id"), _field(reader, "tokenizer.ggml.eot_token_id"))
               if i is not None]
    if eos_ids:
        gen = {"eos_token_id": list(dict.fromkeys(eos_ids))}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def load_gguf(path: str | Path, tokenizer_dir: str | Path | None = None, with_tokenizer: bool = True
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """GGUF file -> (ModelConfig, float32 state_dict under HF names, tokenizer folder or None).

    The tokenizer folder is `tokenizer_dir` (created) or a fresh temporary directory.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    names = {t.name for t in reader.tensors}
    cfg = _config_from_gguf(reader, path, names)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # already turned into cfg.rope_scaling
            continue
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no lmstack counterpart for {cfg.architecture}")
        w = _dequant(t)
        if cfg.model_type == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif cfg.model_type == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        sd[hf] = w
    tok_dir = None
    if with_tokenizer:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="lmstack-gguf-"))
        _write_tokenizer(reader, path, tok_dir)
    return cfg, sd, tok_dir


def _build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str):
    from lmstack.model.rope import RotaryEmbedding
    from lmstack.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if model.rotary is not None:
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    for k, v in sd.items():
        p = params.get(k)
        if p is None:
            raise GGUFError(f"{source}: unexpected tensor {k!r}")
        if tuple(p.shape) != tuple(v.shape):
            raise GGUFError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(v.to(dtype))
    missing = sorted(set(params) - set(sd) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise GGUFError(f"{source}: missing tensors: {missing[:5]}")
    return model.eval()


def load_gguf_model(path: str | Path, dtype: str | torch.dtype | None = torch.float32):
    """GGUF file -> (Transformer in eval mode, lmstack Tokenizer). What load_model / LLM call for *.gguf."""
    from lmstack.model.loading import resolve_dtype
    from lmstack.tokenizer import Tokenizer

    cfg, sd, tok_dir = load_gguf(path)
    dt = resolve_dtype(dtype if dtype not in (None, "auto") else "float32", cfg)
    return _build_model(cfg, sd, dt, str(path)), Tokenizer.from_dir(tok_dir)


def gguf_to_hf(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF file into an HF folder (config.json, model.safetensors, tokenizer files)."""
    from lmstack.model.loading import save_model

    out = Path(out_dir)
    cfg, sd, _ = load_gguf(path, tokenizer_dir=out)
    save_model(_build_model(cfg, sd, dtype, str(path)), out)
    return out
