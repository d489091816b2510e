"""Checkpoint formats (HF folders, quantized folders, GGUF files): reading, writing, and the bounds
checked before a load."""
