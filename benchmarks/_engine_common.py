"""Shared helpers of the engine benchmarks (throughput / latency / prefix_cache): the random-weight
model with Qwen2.5-0.5B's exact shape, the same weights in transformers, and CPU peak measurements."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.precision import auto_dtype  # noqa: E402
from lmstack.model.transformer import Transformer  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "bench_models" / "qwen2.5-0.5b" / "config.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_dtype(name: str) -> torch.dtype:
    return auto_dtype() if name == "auto" else DTYPES[name]


def bench_config(num_layers: int | None = None) -> ModelConfig:
    if not BENCH_CONFIG.is_file():
        raise SystemExit(f"missing {BENCH_CONFIG} (the Qwen2.5-0.5B shape)")
    cfg = ModelConfig.from_hf(BENCH_CONFIG.parent)
    if num_layers:
        cfg = cfg.replace(num_layers=num_layers)
    return cfg


def random_model(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device="cpu")
    from lmstack.model.rope import RotaryEmbedding

    m.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    if cfg.tie_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m.init_weights()
    return m.to(dtype).eval()


def hf_model(cfg: ModelConfig, model: Transformer, dtype: torch.dtype):
    """The same weights in transformers' Qwen2ForCausalLM (sdpa attention)."""
    import transformers as tf

    hcfg = tf.Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = tf.Qwen2ForCausalLM(hcfg)
    hf = hf.to_empty(device="cpu").to(dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg)  # non-persistent buffers
    return hf.eval()


def matmul_peak_flops(dtype: torch.dtype, m: int = 1024, k: int = 896, n: int = 4864, reps: int = 5) -> float:
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights multiplied per token by the decoder layers (no embedding, no LM head)."""
    D, I, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = D * cfg.num_heads * Dh * 2 + D * cfg.num_kv_heads * Dh * 2
    mlp = 3 * D * I if cfg.gated_mlp else 2 * D * I
    return cfg.num_layers * (attn + mlp)


def table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])
