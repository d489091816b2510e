"""ModelConfig: one dataclass for every supported decoder family, read from / written to HF config.json.

The decoder is configured by flags, not subclasses (DESIGN.md): each supported HF architecture is
a set of flag values here, and `to_hf()` writes a config.json that transformers loads back.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint or run configuration that lmstack cannot use; the message names file/field/value."""


# HF `architectures[0]` -> model_type. The causal-LM classes lmstack implements.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
}
# Sequence-classification heads (reward models) share the backbone.
SEQ_CLS_ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "MistralForSequenceClassification": "mistral",
}
_CAUSAL_BY_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_SEQ_CLS_BY_TYPE = {v: k for k, v in SEQ_CLS_ARCHITECTURES.items()}

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu")  # model/layers.py implements these
# RoPE angles are pos * inv_freq in float32, which holds every integer position exactly only up to 2^24;
# no supported checkpoint comes near it (Qwen2.5-1M: 1,010,000) and a larger value is a corrupt file.
MAX_POSITIONS = 1 << 24
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim")
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
          list: "a JSON list", "ids": "an integer or a list of integers"}


def check_value(where: str, value: Any, kind: Any, lo: float | None = None) -> Any:
    """`value` if it has the JSON type `kind` (and is >= lo), else a ConfigError naming `where`.

    Strict as JSON is typed: "64", 64.0 and true are not integers (Python numbers from a GGUF file or
    numpy are, and come back as int / float)."""
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    elif kind == "ids":
        ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
            isinstance(value, list) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value))
    else:
        ok = isinstance(value, kind)
    if not ok:
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        raise ConfigError(f"{where} must be {_KINDS[kind]}, got {shown} ({type(value).__name__})")
    if kind is int:
        value = int(value)
    elif kind is float:
        value = float(value)
    if lo is not None and value < lo:
        raise ConfigError(f"{where} must be {'positive' if lo == 1 and kind is int else f'>= {lo}'}, got {value}")
    return value


def read_json_object(path: Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A JSON file that must hold an object; every failure names the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        what = "empty file" if path.stat().st_size == 0 else f"invalid JSON ({e})"
        raise error(f"{path}: {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama | qwen2 | qwen3 | mistral | phi3 | gpt2
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Architectural flags
    pos: str = "rope"  # "rope" | "learned"
    norm: str = "rms"  # "rms" | "layer"
    act: str = "silu"  # silu (gated SwiGLU) | gelu_new / gelu (plain 2-layer MLP)
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    # Token ids and bookkeeping
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    # Head: "lm" (causal LM) or "score" (sequence classification / reward model)
    head: str = "lm"
    num_labels: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF keys, written back verbatim

    def __post_init__(self) -> None:
        # Types first (a validated dataclass): a config built in code gets the same checks as config.json.
        for name in ("model_type", "pos", "norm", "act", "head", "torch_dtype"):
            check_value(name, getattr(self, name), str)
        for name in ("gated_mlp", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tie_embeddings"):
            check_value(name, getattr(self, name), bool)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings", "num_labels"):
            setattr(self, name, check_value(name, getattr(self, name), int, lo=1))
        self.head_dim = check_value("head_dim", self.head_dim, int, lo=0)
        self.norm_eps = check_value("norm_eps", self.norm_eps, float)
        self.rope_theta = check_value("rope_theta", self.rope_theta, float)
        self.initializer_range = check_value("initializer_range", self.initializer_range, float, lo=0)
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"norm_eps and rope_theta must be positive, got {self.norm_eps} and {self.rope_theta}")
        if self.sliding_window is not None:
            self.sliding_window = check_value("sliding_window", self.sliding_window, int, lo=1)
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                setattr(self, name, check_value(name, getattr(self, name), int))
        if self.eos_token_id is not None:
            check_value("eos_token_id", self.eos_token_id, "ids")
        check_value("extra", self.extra, dict)
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(f"max_position_embeddings {self.max_position_embeddings} is over lmstack's limit of "
                              f"{MAX_POSITIONS} (2^24: float32 RoPE angles are exact only up to there)")
        if self.model_type not in _CAUSAL_BY_TYPE:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {sorted(_CAUSAL_BY_TYPE)}"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} must be a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.pos not in ("rope", "learned"):
            raise ConfigError(f"pos must be 'rope' or 'learned', got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary position embeddings")
        if self.norm not in ("rms", "layer"):
            raise ConfigError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"activation {self.act!r} is not supported; supported: {list(ACTIVATIONS)}")
        if self.head not in ("lm", "score"):
            raise ConfigError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(check_value("rope_scaling", self.rope_scaling, dict))

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (a tied head counted once), from the fields alone,
        so that a model too large for memory is refused before anything is allocated."""
        D, V, hd, H, Hkv, inner = (self.hidden_size, self.vocab_size, self.head_dim, self.num_heads,
                                   self.num_kv_heads, self.intermediate_size)
        norm = 2 * D if self.norm == "layer" else D  # LayerNorm has a bias
        attn = 2 * D * H * hd + 2 * D * Hkv * hd  # q, o and k, v
        attn += (H * hd + 2 * Hkv * hd if self.qkv_bias else 0) + (D if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        n_in = 2 if self.gated_mlp else 1  # gate and up, or up
        mlp = (n_in + 1) * D * inner + (n_in * inner + D if self.mlp_bias else 0)
        emb = V * D + (self.max_position_embeddings * D if self.pos == "learned" else 0)
        head = D * self.num_labels if self.head == "score" else (0 if self.tie_embeddings else V * D)
        return emb + self.num_layers * (attn + mlp + 2 * norm) + norm + head

    @property
    def architecture(self) -> str:
        return (_SEQ_CLS_BY_TYPE if self.head == "score" else _CAUSAL_BY_TYPE)[self.model_type]

    def replace(self, **changes: Any) -> "ModelConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return ModelConfig(**d)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got a JSON {type(d).__name__}")
        f = _HFFields(d, source)
        archs = f.get("architectures", list) or []
        arch = archs[0] if archs else None
        if arch is not None:
            check_value(f"{source}: architectures[0]", arch, str)
        check_value(f"{source}: model_type", d.get("model_type", ""), str)
        head = "lm"
        if arch in SUPPORTED_ARCHITECTURES:
            model_type = SUPPORTED_ARCHITECTURES[arch]
        elif arch in SEQ_CLS_ARCHITECTURES:
            model_type, head = SEQ_CLS_ARCHITECTURES[arch], "score"
        elif arch is None and d.get("model_type") in _CAUSAL_BY_TYPE:
            model_type = d["model_type"]
        else:
            raise ConfigError(
                f"{source}: architecture {arch!r} (model_type {d.get('model_type')!r}) is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES) + sorted(SEQ_CLS_ARCHITECTURES)}"
            )

        if model_type == "gpt2":
            hidden = f.need("n_embd")
            kw = dict(
                vocab_size=f.need("vocab_size"),
                hidden_size=hidden,
                intermediate_size=f.get("n_inner", int, 1) or 4 * hidden,
                num_layers=f.need("n_layer"),
                num_heads=f.need("n_head"),
                num_kv_heads=d["n_head"],
                max_position_embeddings=f.get("n_positions", int, 1, 1024),
                norm_eps=f.get("layer_norm_epsilon", float, None, 1e-5),
                pos="learned",
                norm="layer",
                act=f.get("activation_function", str, None, "gelu_new"),
                gated_mlp=False,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                tie_embeddings=f.get("tie_word_embeddings", bool, None, True),
            )
        else:
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
                f.need(k)
            n_layers = d["num_hidden_layers"]
            sliding = None
            use_sliding = f.get("use_sliding_window", bool, None, False)
            window_layers = f.get("max_window_layers", int, 0, 0)
            if model_type in ("mistral", "phi3") or (model_type in ("qwen2", "qwen3") and use_sliding):
                sliding = f.get("sliding_window", int, 1)
            else:
                f.get("sliding_window", int, 1)  # checked, unused
            if model_type in ("qwen2", "qwen3") and use_sliding and window_layers < n_layers:
                raise ConfigError(
                    f"{source}: use_sliding_window with max_window_layers < num_hidden_layers "
                    "(sliding window on only some layers) is not supported"
                )
            # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
            rope_params = dict(f.get("rope_parameters", dict) or {})
            theta = rope_params.pop("rope_theta", None)
            rope_theta = (check_value(f"{source}: rope_parameters.rope_theta", theta, float) if theta is not None
                          else f.get("rope_theta", float, None, 10000.0))
            rope_scaling = f.get("rope_scaling", dict)
            if rope_params and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                rope_scaling = rope_params
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            if model_type == "phi3":
                rope_scaling = _phi3_rope(f, rope_scaling, source)
            act = f.get("hidden_act", str, None, "silu")
            if act != "silu":
                raise ConfigError(f"{source}: hidden_act {act!r} is not supported for {model_type} (only 'silu')")
            attention_bias = f.get("attention_bias", bool, None, False)
            n_heads = d["num_attention_heads"]
            kw = dict(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=n_layers,
                num_heads=n_heads,
                num_kv_heads=f.get("num_key_value_heads", int, 1) or n_heads,
                head_dim=f.get("head_dim", int, 0) or 0,
                max_position_embeddings=f.get("max_position_embeddings", int, 1, 2048),
                norm_eps=f.get("rms_norm_eps", float, None, 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                act="silu",
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=attention_bias,
                mlp_bias=f.get("mlp_bias", bool, None, False),
                qk_norm=model_type == "qwen3",
                tie_embeddings=f.get("tie_word_embeddings", bool, None, False),
                sliding_window=sliding,
            )
        num_labels = 1
        if head == "score":  # a causal LM's id2label / num_labels (if any) stay in `extra`, written back as read
            id2label = f.get("id2label", dict)
            num_labels = len(id2label) if id2label else f.get("num_labels", int, 1, 1)
        kw.update(
            model_type=model_type,
            bos_token_id=f.get("bos_token_id", int),
            eos_token_id=f.get("eos_token_id", "ids"),
            pad_token_id=f.get("pad_token_id", int),
            torch_dtype=f.get("torch_dtype", str) or f.get("dtype", str) or "float32",
            initializer_range=f.get("initializer_range", float, 0, 0.02),
            head=head,
            num_labels=num_labels,
        )
        kw["extra"] = {k: v for k, v in d.items() if k not in f.used}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"{model_dir}: not a directory (expected a Hugging Face model folder)")
        if not path.is_file():
            raise ConfigError(f"{path}: config.json is missing")
        return cls.from_hf_dict(read_json_object(path), source=str(path))

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(architectures=[self.architecture], model_type=self.model_type)
        if self.model_type == "gpt2":
            d.update(
                vocab_size=self.vocab_size, n_embd=self.hidden_size, n_inner=self.intermediate_size,
                n_layer=self.num_layers, n_head=self.num_heads, n_positions=self.max_position_embeddings,
                n_ctx=self.max_position_embeddings, layer_norm_epsilon=self.norm_eps,
                activation_function=self.act, tie_word_embeddings=self.tie_embeddings,
            )
        else:
            d.update(
                vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
                rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                hidden_act=self.act, tie_word_embeddings=self.tie_embeddings,
            )
            if self.model_type in ("llama", "qwen3"):
                d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
            if self.model_type in ("mistral", "phi3"):
                d["sliding_window"] = self.sliding_window
            if self.model_type == "phi3":
                s = dict(self.rope_scaling or {})
                d["original_max_position_embeddings"] = s.pop("original_max_position_embeddings",
                                                              self.max_position_embeddings)
                d["rope_scaling"] = s or None
                d["partial_rotary_factor"] = 1.0
            if self.model_type in ("qwen2", "qwen3"):
                d["use_sliding_window"] = self.sliding_window is not None
                d["sliding_window"] = self.sliding_window
                d["max_window_layers"] = self.num_layers
        d.update(
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            torch_dtype=self.torch_dtype, initializer_range=self.initializer_range,
        )
        if self.head == "score":
            d["num_labels"] = self.num_labels
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d

    def save(self, model_dir: str | Path) -> None:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / "config.json").write_text(json.dumps(self.to_hf(), indent=2) + "\n")


class _HFFields:
    """Typed reads of config.json keys: a missing required key, a wrong type or an out-of-range value is
    an error naming the file and the key. JSON null reads as absent (transformers' default applies)."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d, self.source = d, source
        self.used: set[str] = {"architectures", "model_type"}

    def get(self, key: str, kind: Any, lo: float | None = None, default: Any = None) -> Any:
        self.used.add(key)
        value = self.d.get(key)
        return default if value is None else check_value(f"{self.source}: {key}", value, kind, lo)

    def need(self, key: str) -> int:
        """A required positive integer (a size)."""
        if key not in self.d:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        self.used.add(key)
        return check_value(f"{self.source}: {key}", self.d[key], int, 1)


def _phi3_rope(f: "_HFFields", scaling: dict | None, source: str) -> dict | None:
    """Phi-3 keeps original_max_position_embeddings beside rope_scaling; LongRoPE ("longrope", older
    files "su") needs it inside. Partial rotary (Phi-4-mini's 0.75) is not implemented."""
    orig = f.get("original_max_position_embeddings", int, 1)
    partial = f.get("partial_rotary_factor", float, None, (scaling or {}).get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is not supported (only 1.0)")
    if scaling is None:
        return None
    scaling = dict(scaling)
    if scaling.get("type") == "su" or scaling.get("rope_type") == "su":
        scaling.pop("type", None)
        scaling["rope_type"] = "longrope"
    if orig is not None:
        scaling.setdefault("original_max_position_embeddings", orig)
    return scaling


def _check_rope_scaling(s: dict[str, Any]) -> None:
    rtype = s.get("rope_type", s.get("type", "default"))
    if rtype not in _ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rtype!r} is not supported; supported: {list(_ROPE_TYPES)}")
    for key in _ROPE_NUMBERS:
        if s.get(key) is not None:
            check_value(f"rope_scaling.{key}", s[key], float)
    if s.get("original_max_position_embeddings") is not None:
        check_value("rope_scaling.original_max_position_embeddings", s["original_max_position_embeddings"], int, lo=1)
    if rtype in ("linear", "dynamic", "llama3") and not (isinstance(s.get("factor"), numbers.Real) and s["factor"] > 0):
        raise ConfigError(f"rope_scaling type {rtype!r} needs a positive factor, got {s.get('factor')!r}")
    if rtype == "longrope":
        for key in ("short_factor", "long_factor"):
            v = s.get(key)
            if not (isinstance(v, list) and v and all(isinstance(x, numbers.Real) and x > 0 for x in v)):
                raise ConfigError(f"rope_scaling: longrope needs {key} as a list of positive numbers, got {v!r}")
        if s.get("original_max_position_embeddings") is None:
            raise ConfigError("rope_scaling: longrope needs original_max_position_embeddings")
    if rtype == "llama3":
        low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        if not low < high:
            raise ConfigError(f"rope_scaling: llama3 needs low_freq_factor < high_freq_factor, got {low} and {high}")


def config_summary(cfg: ModelConfig) -> dict[str, Any]:
    """A flat dict for logs and reports."""
    return {k: v for k, v in asdict(cfg).items() if k != "extra"}
