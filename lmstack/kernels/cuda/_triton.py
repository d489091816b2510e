"""Optional Triton: kernels import without it, and every API falls back to its PyTorch reference.

Triton APIs used (the intersection of Triton 3.1, the oldest that a supported PyTorch >= 2.5 ships,
3.6, pinned by PyTorch 2.11 on the project's GPU machine, and 3.9, PyPI's at the time of writing):
tl.load / tl.store with masks on pointer tensors (no block pointers or tensor descriptors),
tl.dot (fp32 accumulation, `input_precision`), tl.arange / zeros / full / where / max / sum / argmax
/ exp / log / sqrt, python `range` loops with runtime bounds, early `return`, uint64 integer
arithmetic. No tl.gather, tl.join / interleave, tl.sort, tl.range pipelining hints or autotuning.

Where the kernels run: CUDA tensors on a machine with Triton; CPU tensors when Triton's interpreter
is on (TRITON_INTERPRET=1 in the environment *before* this package is imported: `triton.jit` reads
it when a kernel is decorated). The interpreter runs each program in numpy and cannot compute in
bfloat16, so bf16 CPU tensors take the reference path. LMSTACK_TRITON=0 forces the references
everywhere (the GPU benchmark's baseline).

What the interpreter checks: indexing, masks, the algorithms' arithmetic (numpy, fp32 / fp16), the
tl.dot shape minimum. What only a GPU run checks (scripts/gpu_check.sh): that each kernel compiles
for the target (the compiler rejects some programs the interpreter runs), bf16, register pressure
and spills at the chosen block sizes / num_warps, the GPU's approximate exp2 / log and fused
multiply-adds (hence tolerances, not equality, in the tests), and every speed claim.
"""
import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU install: no Triton, every op runs its PyTorch reference
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` / `triton.language` so kernel definitions still import: kernel
        signatures evaluate `tl.constexpr` at definition, and `triton.jit` must return something.
        Nothing here is ever called: `usable()` is False without Triton."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(int(n) - 1, 0).bit_length()

    triton = tl = _NoTriton()  # type: ignore[assignment]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled() -> bool:
    return HAS_TRITON and os.environ.get("LMSTACK_TRITON", "1").lower() not in ("0", "false", "off", "no")


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: all on one CUDA device, or all on the CPU
    under the interpreter (no bf16 there); float dtypes are checked by each API."""
    if not enabled() or not tensors:
        return False
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        return not INTERPRET
    return INTERPRET and dev.type == "cpu" and all(t.dtype != torch.bfloat16 for t in tensors)


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two >= max(n, lo): tl.arange sizes are powers of two and tl.dot needs
    every dimension >= 16."""
    return max(lo, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE products (the default on NVIDIA GPUs is TF32, ~1e-3 relative error, which
    would fail the fp32 comparisons against the references); 16-bit operands ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H200), for split-K heuristics."""
    return torch.cuda.get_device_properties(device).multi_processor_count
