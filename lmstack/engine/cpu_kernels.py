"""lmstack's C++ CPU kernels (csrc/), compiled on first use with PyTorch's JIT extension builder.

Only the PagedAttention decode kernel lives here (csrc/paged_decode_attention.cpp): decoding
sequences attend over their K/V where it lies in the block pool, instead of gathering a padded copy
first. The build needs a C++ compiler (g++ / clang++); it takes ~20-40 s once and is cached by
PyTorch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Without a compiler, on a non-CPU
device, or with LMSTACK_CPU_KERNELS=0, the engine uses its PyTorch path (gather + SDPA): same
results up to float rounding.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "paged_decode_attention.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def enabled() -> bool:
    return os.environ.get("LMSTACK_CPU_KERNELS", "1").lower() not in ("0", "false", "off", "no")


def load() -> ModuleType | None:
    """The compiled module, building it on the first call; None when disabled or the build failed
    (logged once, then the PyTorch path is used for the rest of the process)."""
    global _module, _failed
    if _module is not None or _failed or not enabled():
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load as build

                flags = ["-O3", "-fopenmp"]
                _module = build(name="lmstack_cpu_kernels", sources=[str(_SRC)], extra_cflags=flags,
                                extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, unsupported platform, ...: fall back, say why once
                _failed = True
                logger.warning("lmstack C++ CPU kernels unavailable (%s: %s); using the PyTorch attention path",
                               type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e).strip() else "")
    return _module


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q (S, H, D) -> (S, H, D): each row's one query over its first ctx_lens[s] pool positions
    (block_tables (S, nblk) int64, padded), the last `window` of them under a sliding window.
    Pools (num_blocks, block_size, Hkv, D) in q's dtype (float32 or bfloat16). Call `load()` first."""
    assert _module is not None, "call cpu_kernels.load() first"
    return _module.paged_decode_attention(q, k_pool, v_pool, block_tables, ctx_lens, float(scale), int(window or 0))


def supports(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (CPU, float32 / bfloat16, contiguous pool)."""
    return (q.device.type == "cpu" and pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.bfloat16)
            and pool.is_contiguous())
