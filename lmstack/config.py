"""ModelConfig: one dataclass for every supported decoder family, read from / written to HF config.json.

The decoder is configured by flags, not subclasses (DESIGN.md): each supported HF architecture is
a set of flag values here, and `to_hf()` writes a config.json that transformers loads back.
"""
from __future__ import annotations

import json
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

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama | qwen2 | qwen3 | mistral | gpt2
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} must be a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.pos not in ("rope", "learned"):
            raise ConfigError(f"pos must be 'rope' or 'learned', got {self.pos!r}")
        if self.norm not in ("rms", "layer"):
            raise ConfigError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.head not in ("lm", "score"):
            raise ConfigError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {rtype!r} is not supported; supported: {list(_ROPE_TYPES)}")

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

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
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
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

        def need(key: str) -> Any:
            if key not in d:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return d[key]

        used: set[str] = {"architectures", "model_type"}

        def get(key: str, default: Any = None) -> Any:
            used.add(key)
            return d.get(key, default)

        if model_type == "gpt2":
            for k in ("n_embd", "n_layer", "n_head", "vocab_size"):
                need(k)
            hidden = get("n_embd")
            kw = dict(
                vocab_size=get("vocab_size"),
                hidden_size=hidden,
                intermediate_size=get("n_inner") or 4 * hidden,
                num_layers=get("n_layer"),
                num_heads=get("n_head"),
                num_kv_heads=get("n_head"),
                max_position_embeddings=get("n_positions", 1024),
                norm_eps=get("layer_norm_epsilon", 1e-5),
                pos="learned",
                norm="layer",
                act=get("activation_function", "gelu_new"),
                gated_mlp=False,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                tie_embeddings=get("tie_word_embeddings", True),
            )
        else:
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
                need(k)
            n_heads = get("num_attention_heads")
            sliding = None
            if model_type == "mistral":
                sliding = get("sliding_window")
            elif model_type in ("qwen2", "qwen3") and get("use_sliding_window", False):
                sliding = get("sliding_window")
            get("max_window_layers")
            if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
                if d.get("max_window_layers", 0) < d["num_hidden_layers"]:
                    raise ConfigError(
                        f"{source}: use_sliding_window with max_window_layers < num_hidden_layers "
                        "(sliding window on only some layers) is not supported"
                    )
            # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
            rope_params = dict(get("rope_parameters") or {})
            rope_theta = float(rope_params.pop("rope_theta", None) or get("rope_theta", 10000.0))
            rope_scaling = get("rope_scaling")
            if rope_params and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                rope_scaling = rope_params
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            act = get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{source}: hidden_act {act!r} is not supported for {model_type} (only 'silu')")
            kw = dict(
                vocab_size=get("vocab_size"),
                hidden_size=get("hidden_size"),
                intermediate_size=get("intermediate_size"),
                num_layers=get("num_hidden_layers"),
                num_heads=n_heads,
                num_kv_heads=get("num_key_value_heads") or n_heads,
                head_dim=get("head_dim") or 0,
                max_position_embeddings=get("max_position_embeddings", 2048),
                norm_eps=get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                act="silu",
                qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
                o_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                tie_embeddings=get("tie_word_embeddings", False),
                sliding_window=sliding,
            )
            get("sliding_window")
            get("use_sliding_window")
        kw.update(
            model_type=model_type,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
            torch_dtype=str(get("torch_dtype") or get("dtype") or "float32"),
            initializer_range=get("initializer_range", 0.02),
            head=head,
            num_labels=len(d["id2label"]) if head == "score" and "id2label" in d else d.get("num_labels", 1),
        )
        kw["extra"] = {k: v for k, v in d.items() if k not in used}
        return cls(**kw)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"{model_dir}: not a directory (expected a Hugging Face model folder)")
        if not path.is_file():
            raise ConfigError(f"{path}: config.json is missing")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

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
            if self.model_type == "mistral":
                d["sliding_window"] = self.sliding_window
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


def config_summary(cfg: ModelConfig) -> dict[str, Any]:
    """A flat dict for logs and reports."""
    return {k: v for k, v in asdict(cfg).items() if k != "extra"}
