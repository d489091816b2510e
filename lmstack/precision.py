"""The one rule for dtype="auto", used by every entry point (LLM, serve, chat, generate, eval, GGUF
loading, export): so the same prompt gets the same answer from every verb.

    auto = bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), float32 otherwise
           (on CUDA: bfloat16 where supported, else float16)

whatever the checkpoint stores (fp32, bf16, fp16, or a GGUF quantization). Why: on CPUs with native
bf16 a bf16 matmul runs several times faster than fp32 and decode reads half the bytes, and bf16 is the
precision today's checkpoints are trained and shipped in; without it (AVX2-only CPUs) PyTorch emulates
bf16 and it is slower than fp32, while fp32 holds every stored type (bf16, fp16, dequantized GGUF
blocks) exactly. Keeping a checkpoint's own torch_dtype instead would run fp16 checkpoints in fp16,
which CPUs do not multiply natively, and fp32 checkpoints 2-4x slower than needed. Storage is another
matter: files lmstack writes keep the source's precision (see gguf_to_hf, quantize).
"""
from __future__ import annotations

import torch

from lmstack.log import logger
from lmstack.model.layers import cpu_has
from lmstack.model.loading import DTYPES


def native_bf16_cpu() -> bool:
    return cpu_has("avx512_bf16", "amx_bf16")


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """What dtype="auto" means on this device (see the module docstring)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16_cpu() else torch.float32


def compute_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                  what: str | None = None) -> torch.dtype:
    """A dtype argument ("auto", a name such as "bfloat16" / "bf16", or a torch.dtype) -> torch.dtype.
    With `what` (e.g. the model path), logs the choice once, as every entry point does at start-up."""
    if isinstance(dtype, torch.dtype):
        dt, why = dtype, "as requested"
    elif dtype in (None, "auto"):
        dt = auto_dtype(device)
        why = ("auto: this CPU multiplies bf16 natively" if dt == torch.bfloat16 else
               "auto: this CPU has no native bf16") if torch.device(device).type == "cpu" else "auto"
    elif dtype in DTYPES:
        dt, why = DTYPES[dtype], "as requested"
    else:
        raise ValueError(f"dtype {dtype!r} is not supported; choose 'auto' or one of {sorted(DTYPES)}")
    if what is not None:
        logger.info("%s: computing in %s (%s)", what, str(dt).removeprefix("torch."), why)
    return dt
