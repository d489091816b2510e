"""Triton kernels for CUDA GPUs, each with the PyTorch reference it is tested against and falls back to.

  decode_attention   paged decode attention (PagedAttention + flash-decoding split-K, GQA, windows)
  prefill_attention  variable-length FlashAttention-2 prefill over the paged cache (prefix + new tokens)
  elementwise        RMSNorm (+ residual add), silu(gate) * up, in-place RoPE on a fused qkv row
  quant_gemm         int8 / AWQ int4 / NF4 dequantize-in-the-GEMM products, NF4 dequantization
  philox, sampler    counter-based (Philox) Gumbel-max sampling with per-row seeds and filters

Every module imports without Triton (the CPU install has none) and then runs its reference; see
_triton.py for when the kernels run (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). The
engine / model integration (registering these as the model's CUDA ops) is not part of this package.
"""
