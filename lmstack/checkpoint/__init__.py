"""Reading and writing checkpoint files: safetensors I/O and the bounds checked before a load."""
