"""Checkpoint formats: HF folders, quantized folders, GGUF files."""
