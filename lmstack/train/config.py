"""Training configuration: YAML -> validated dataclasses, `section.key=value` overrides, run-dir checks.

One generic converter walks the dataclass type hints, so every key in every section (including a
stage's own `algo:` options dataclass) gets the same treatment: type coercion, a "did you mean"
for unknown keys, and errors that name the key, the value and the limit.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmstack.config import ConfigError
from lmstack.model.lora import LoraSpec

FAMILIES = ("llama", "qwen2", "gpt2")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
FORMATS = ("auto", "text", "alpaca", "sharegpt", "messages")


@dataclass
class InitConfig:
    """A fresh model for pretraining from scratch (family + sizes; the vocabulary comes from the tokenizer)."""

    family: str = "llama"
    vocab_size: int = 0  # 0 -> the tokenizer's vocabulary size
    hidden_size: int = 256
    intermediate_size: int = 0  # 0 -> family default (SwiGLU: ~8/3 * hidden rounded to 64; gpt2: 4 * hidden)
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 -> num_heads (no GQA)
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model.init.family {self.family!r} is not supported; choose one of {list(FAMILIES)}")
        for k in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.init.{k} must be positive, got {getattr(self, k)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.init.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.init.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.family == "gpt2" and self.num_kv_heads not in (0, self.num_heads):
            raise ConfigError("model.init.num_kv_heads: gpt2 has no grouped-query attention; leave it 0")


@dataclass
class ModelSection:
    path: str | None = None  # an HF folder to start from
    tokenizer: str | None = None  # tokenizer folder; defaults to `path`
    init: InitConfig | None = None  # build from scratch instead of loading `path`

    def __post_init__(self) -> None:
        if (self.path is None) == (self.init is None):
            raise ConfigError("model: give exactly one of `model.path` (an HF folder) or `model.init` (a fresh model)")
        if self.init is not None and self.tokenizer is None:
            raise ConfigError("model.tokenizer is required with model.init (the vocabulary comes from it)")

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or str(self.path)


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | text | alpaca | sharegpt | messages
    max_len: int = 512
    packing: bool = True  # pretraining text only: documents packed into max_len sequences
    eval_fraction: float = 0.0  # hold out this fraction of train when `eval` is empty
    shuffle: bool = True
    text_field: str = "text"

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train is empty: give one or more dataset files")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format {self.format!r} is not one of {list(FORMATS)}")
        if self.max_len < 2:
            raise ConfigError(f"data.max_len must be >= 2, got {self.max_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class OptimSection:
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainingSection:
    max_steps: int = 0  # optimizer steps; 0 -> derived from `epochs`
    epochs: float = 1.0
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights)
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 -> only at the end (when there is eval data)
    eval_batches: int = 0  # 0 -> the whole eval set
    save_every: int = 0  # steps; 0 -> only at the end / on Ctrl-C
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    out_dir: str = "runs/run"
    resume: bool = True  # continue from the latest checkpoint in out_dir if there is one
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for k in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"training.{k} must be positive, got {getattr(self, k)}")
        for k in ("max_steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints"):
            if getattr(self, k) < 0:
                raise ConfigError(f"training.{k} must be >= 0, got {getattr(self, k)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("training: set max_steps > 0 or epochs > 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"training.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"training.precision {self.precision!r} is not one of {list(PRECISIONS)}")


@dataclass
class LoraSection(LoraSpec):
    """`lora:` keys: the adapter spec (r, alpha, dropout, target_modules, use_rslora; validated by
    LoraSpec) plus where the frozen base lives."""

    qlora: bool = False  # base weights stored as NF4, computed in bf16
    # QLoRA only: the token embedding and LM head (tied or not) are stored as NF4 too. Off by default,
    # as in the QLoRA paper / bitsandbytes (only linear layers); on, a small model's largest frozen
    # matrix shrinks ~3.6x (SmolLM2-135M: 54 -> 15 MiB) for a little extra quantization error.
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize_embeddings and not self.qlora:
            raise ConfigError("lora.quantize_embeddings: true needs lora.qlora: true (it stores the frozen "
                              "embedding as NF4, which only QLoRA does)")


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection = field(default_factory=OptimSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    lora: LoraSection | None = None
    algo: dict[str, Any] = field(default_factory=dict)  # stage options, validated by the stage
    stage: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may differ between a run and its resumption (they do not change what is computed; a run
# directory copied or moved elsewhere resumes from where it now is).
RESUME_MUTABLE = {"training.max_steps", "training.epochs", "training.eval_every", "training.save_every",
                  "training.log_every", "training.resume", "training.keep_checkpoints", "training.eval_batches",
                  "training.device", "training.out_dir"}


# ----------------------------------------------------------------------------- generic conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the annotated type `tp`, or raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        # Try the non-None members, str last so "8" becomes an int where an int is allowed.
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys for this section, got {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",")]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


# Spellings users bring from transformers / PEFT / other trainers.
_ALIASES = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "num_train_epochs": "epochs", "max_seq_length": "max_len", "max_length": "max_len",
            "bf16": "precision", "output_dir": "out_dir", "lr_scheduler_type": "schedule"}


def _suggest(key: str, names: list[str]) -> str | None:
    alias = difflib.get_close_matches(key, [a for a in _ALIASES if _ALIASES[a] in names], n=1, cutoff=0.8)
    if alias:
        return _ALIASES[alias[0]]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return close[0] if close else None


def build(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass `cls` from `raw`; unknown keys raise ConfigError with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in hints:
            hint = ""
            guess = _suggest(str(key), names)
            if guess:
                hint = f"; did you mean {((where + '.') if where else '') + guess!r}?"
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys here: {names})")
        kwargs[key] = coerce(value, hints[key], full)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config section {where or '(top level)'!r} is missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded above
        raise ConfigError(f"{where}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.lr=1e-4` -> (["training", "lr"], "1e-4" parsed by YAML); typing happens in `build`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, _, value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; keep strings as given, `coerce` converts them by type.
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, stage: str = "") -> TrainConfig:
    """Read YAML (or take `raw`), apply `section.key=value` overrides, validate into a TrainConfig."""
    if raw is None:
        if path is None:
            raise ConfigError("load_config: give a YAML path or a raw dict")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    else:
        raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through plain types
    raw = apply_overrides(raw, list(overrides or []))
    if stage:
        if raw.get("stage") not in (None, "", stage):
            raise ConfigError(f"config says stage {raw['stage']!r} but the command asked for {stage!r}")
        raw["stage"] = stage
    if raw.get("lora") is False:
        raw["lora"] = None
    return build(TrainConfig, raw)


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not d and prefix:
            out[prefix] = {}
        return out
    return {prefix: d}


def check_resume_compatible(cfg: TrainConfig, run_dir: str | Path) -> None:
    """Refuse to resume a run directory that was created from a different configuration."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved_path}: cannot be read as this run's configuration ({type(e).__name__}: {e})") from None
    now = _flatten(yaml.safe_load(config_to_yaml(cfg)))
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in RESUME_MUTABLE and saved.get(k, "<absent>") != now.get(k, "<absent>")]
    if diffs:
        shown = "; ".join(f"{k}: run has {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}" for k in diffs[:6])
        raise ConfigError(
            f"{run_dir} holds a run created from a different config ({shown}). "
            "Use a new training.out_dir for the new config."
        )
