"""Per-device kernel packages (`cuda/`: Triton kernels with PyTorch reference fallbacks)."""
