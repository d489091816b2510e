"""Philox4x32-10 (Salmon et al., SC 2011: "Parallel random numbers: as easy as 1, 2, 3") on the
device and in PyTorch, bit-identical, for counter-based sampling noise.

A counter-based generator is a pure function: (counter, key) -> 4 random 32-bit words. The sampler
keys it with the request's seed and counts with (token index, decoding step), so a draw depends on
nothing but (seed, step, token): not on the batch, the order of rows, the launch grid or the device.
(A stateful generator, as torch.Generator, has to be advanced row by row on the host instead.)

Round function (10 rounds, the key bumped by the Weyl constants after each):
  (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))
with A = 0xD2511F53, B = 0xCD9E8D57 and hi / lo the halves of the 64-bit product. Both versions
here compute in 64-bit integers holding 32-bit values (Triton: uint64, whose product of two 32-bit
numbers is exact; PyTorch: int64, with B c split into 16-bit halves so nothing overflows), which
needs no unsigned 32-bit support from either and no version-specific Triton RNG API (tl.randint's
counter layout has changed across Triton releases; this one is fixed here and tested against the
published Random123 known-answer vectors).

Uniforms: u = (r0 >> 8 + 0.5) / 2^24 in (0, 1), exact in fp32 (never 0 or 1, so -log(-log u) is
finite); Gumbel noise g = -log(-log(u)).
"""
import torch

from lmstack.kernels.cuda._triton import tl, triton, usable

M32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


@triton.jit
def _mulhilo(a, c):
    """(hi, lo) 32-bit halves of a * c for 32-bit values held in uint64."""
    p = c * a
    return p >> 32, p & 0xFFFFFFFF


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 tensors holding 32-bit values (broadcastable shapes)."""
    for _ in tl.static_range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@triton.jit
def gumbel(seed, step, tok):
    """Gumbel(0, 1) noise for token indices `tok` (a block) of the row keyed by (seed, step), fp32."""
    seed = seed.to(tl.uint64)
    step = step.to(tl.uint64)
    c0 = tok.to(tl.uint64)
    r0, _, _, _ = philox4x32(c0, step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF, c0 * 0,
                             seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    u = ((r0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_kernel(seeds_ptr, steps_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = gumbel(tl.load(seeds_ptr + row), tl.load(steps_ptr + row), tok)
    tl.store(out_ptr + row.to(tl.int64) * V + tok, g, mask=tok < V)


# ------------------------------------------------------------------------------------ references
def _mulhilo_ref(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of a * c for a 32-bit constant and int64 tensors of 32-bit values: a = ah 2^16 + al,
    t = c ah + (c al >> 16) < 2^49, so a c = t 2^16 + (c al & 0xFFFF) with no int64 overflow."""
    ah, al = a >> 16, a & 0xFFFF
    cl = c * al
    t = c * ah + (cl >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (cl & 0xFFFF)


def philox4x32_ref(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """The same function on int64 tensors (or ints) of 32-bit values; returns 4 int64 tensors."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo_ref(ROUND_B, c2)
        hi_a, lo_a = _mulhilo_ref(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def gumbel_noise_ref(seeds: torch.Tensor, steps: torch.Tensor, V: int) -> torch.Tensor:
    """(N,) int64 seeds and steps -> (N, V) fp32 Gumbel noise, row i keyed by (seeds[i], steps[i])."""
    seeds, steps = seeds.long()[:, None], steps.long()[:, None]  # (N, 1)
    tok = torch.arange(V, device=seeds.device)[None, :]  # (1, V)
    r0, _, _, _ = philox4x32_ref(tok, steps & M32, (steps >> 32) & M32, torch.zeros_like(tok), seeds & M32,
                                 (seeds >> 32) & M32)
    u = ((r0 >> 8).float() + 0.5) * 2.0 ** -24
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, V: int, block: int = 1024) -> torch.Tensor:
    """(N, V) Gumbel noise on the device (Triton) or through the reference; the same values either way
    up to the last bit of log."""
    if not usable(seeds, steps):
        return gumbel_noise_ref(seeds, steps, V)
    N = seeds.shape[0]
    out = torch.empty(N, V, dtype=torch.float32, device=seeds.device)
    if N and V:
        _gumbel_kernel[(N, triton.cdiv(V, block))](seeds.long().contiguous(), steps.long().contiguous(), out, V, BLOCK=block)
    return out
