"""lmstack's C++ CPU kernels (csrc/), compiled on first use with PyTorch's JIT extension builder.

- csrc/paged_decode_attention.cpp: decoding sequences attend over their K/V where it lies in the
  engine's block pool (PagedAttention), instead of gathering a padded copy first.
- csrc/fused_elementwise.cpp: RMSNorm (+ residual add), silu(gate) * up and RoPE as one call each,
  for CPU inference (no autograd) in float32 / bfloat16.
- csrc/decode_layers.cpp: every decoder layer of a pure-decode engine step in one call, without
  returning to Python between ops (engine/model_runner.py CppDecode decides when it applies).
- csrc/nf4_decode.cpp: QLoRA's NF4 weights decoded straight into fp32 / bf16 (model/quant.py).
The build needs a C++ compiler (g++ / clang++); it takes ~30 s once on 2 cores and is cached by PyTorch
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Without a compiler, on other devices,
or with LMSTACK_CPU_KERNELS=0, the PyTorch ops run instead: same results up to float rounding.

The extension's name carries a hash of the sources, flags and torch version, so two checkouts or
versions never build over each other. PyTorch's builder waits forever on a `lock` file that a killed
build left behind; every lmstack build first takes an flock (the kernel releases it when its holder
dies), and whoever holds it knows no build is running and removes a leftover `lock` with a warning.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("module.cpp", "paged_decode_attention.cpp", "fused_elementwise.cpp", "decode_layers.cpp", "nf4_decode.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def enabled() -> bool:
    """LMSTACK_CPU_KERNELS=0 turns the kernels off (read when they are first needed)."""
    return os.environ.get("LMSTACK_CPU_KERNELS", "1").lower() not in ("0", "false", "off", "no")


def _put_ninja_on_path() -> None:
    """PyTorch's extension builder runs `ninja`; PyPI's ninja package (a dependency) ships the binary
    in its own folder, which is not on PATH when lmstack runs from a venv that was not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def extension_name() -> str:
    """lmstack_cpu_kernels_<hash of the sources, flags and torch version>."""
    h = hashlib.sha256(f"{torch.__version__} {_FLAGS}".encode())
    for f in _SOURCES + tuple(sorted(p.name for p in _CSRC.glob("*.h"))):
        h.update(f.encode() + b"\0" + (_CSRC / f).read_bytes())
    return f"lmstack_cpu_kernels_{h.hexdigest()[:12]}"


def _build(name: str) -> ModuleType:
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as build

    d = Path(_get_build_directory(name, verbose=False))
    with open(d / "lmstack-build.flock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building lmstack's C++ CPU kernels in %s", d)
            fcntl.flock(held, fcntl.LOCK_EX)
        stale = d / "lock"
        if stale.exists():  # no build runs (we hold the flock): a killed build left it; torch would wait forever
            logger.warning("removing %s, left by a killed build of lmstack's C++ CPU kernels", stale)
            stale.unlink(missing_ok=True)
        cached = any(d.glob(f"{name}*.so"))
        if not cached:
            logger.info("building lmstack's C++ CPU kernels in %s (once, ~30-60 s on 2 cores)", d)
        t0 = time.perf_counter()
        # no fp-contract: GCC would fuse a*b + c into an FMA and round differently from the PyTorch ops
        # the kernels replace
        module = build(name=name, sources=[str(_CSRC / f) for f in _SOURCES], extra_cflags=_FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)
        if not cached:
            logger.info("built lmstack's C++ CPU kernels in %.0f s (cached for later runs)", time.perf_counter() - t0)
        return module


def load() -> ModuleType | None:
    """The compiled module, building it on the first call; None when disabled or the build failed
    (logged once, then the PyTorch path is used for the rest of the process)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if not enabled():
        _failed = True  # off for the rest of the process
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                _put_ninja_on_path()
                _module = _build(extension_name())
            except Exception as e:  # no compiler, unsupported platform, ...: fall back, say why once
                _failed = True
                logger.warning("lmstack C++ CPU kernels unavailable (%s: %s); using PyTorch ops instead",
                               type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e).strip() else "")
    return _module


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q (S, H, D) -> (S, H, D): each row's one query over its first ctx_lens[s] pool positions
    (block_tables (S, nblk) int64, padded), the last `window` of them under a sliding window.
    Pools (num_blocks, block_size, Hkv, D) in q's dtype (float32 or bfloat16). Call `load()` first."""
    assert _module is not None, "call cpu_kernels.load() first"
    return _module.paged_decode_attention(q, k_pool, v_pool, block_tables, ctx_lens, float(scale), int(window or 0))


def supports(kv_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the attention kernel handles a KV pool of this dtype on this device (the engine's pools
    are contiguous (num_blocks, block_size, Hkv, D) tensors)."""
    return device.type == "cpu" and kv_dtype in (torch.float32, torch.bfloat16)


def fast(*tensors: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels serve these tensors: CPU inference (autograd off), one
    dtype, float32 or bfloat16, kernels built (building them on the first such call)."""
    if torch.is_grad_enabled() or _failed:
        return False
    dt = tensors[0].dtype
    if dt not in (torch.float32, torch.bfloat16) or any(t.device.type != "cpu" or t.dtype != dt for t in tensors):
        return False
    return _module is not None or load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., C), HF Llama's rounding order (see layers.RMSNorm)."""
    shape = x.shape
    return _module.rms_norm(x.reshape(-1, shape[-1]), weight, float(eps)).view(shape)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y)): a decoder layer's residual add and the next norm in one pass."""
    shape = x.shape
    s, h = _module.add_rms_norm(x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1]), weight, float(eps))
    return s.view(shape), h.view(shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2I) -> silu(gate) * up (..., I)."""
    shape = gate_up.shape
    return _module.silu_mul(gate_up.reshape(-1, shape[-1])).view(*shape[:-1], shape[-1] // 2)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """In place: x * cos + rotate_half(x) * sin on the first `heads` heads of x (..., >= heads *
    head_dim) (a fused qkv output: q then k heads); cos, sin (..., head_dim) in x's dtype."""
    # view, not reshape: a copy would take the rotation and lose it (x must be row-contiguous)
    _module.rope_(x.view(-1, x.shape[-1]), cos.reshape(-1, head_dim).contiguous(),
                  sin.reshape(-1, head_dim).contiguous(), heads, head_dim)


def nf4_decode(codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, start: int, n: int,
               dtype: torch.dtype) -> torch.Tensor | None:
    """n NF4 weights from flat element `start`: codes (bytes,) uint8, absmax (blocks,) fp32, lut the
    16 fp32 levels -> (n,) in dtype (fp32 / bf16); None where the kernels do not apply (then the
    caller's PyTorch ops run). Not differentiable: the codes are frozen."""
    if codes.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or _failed:
        return None
    if _module is None and load() is None:
        return None
    return _module.nf4_decode(codes, absmax, lut, int(start), int(n), dtype)


def decode_layers(*args):
    """Every decoder layer of a pure-decode engine step in one call; arguments as in
    csrc/decode_layers.cpp (see engine/model_runner.py CppDecode)."""
    return _module.decode_layers(*args)
