"""llama.cpp (llama-cpp-python) as the reference in tests.

`llama_model(path, **kw)` is `llama_cpp.Llama(path, **kw)` with llama.cpp's extra buffer types (weight
repacking into its AMX / interleaved layouts) off: llama-cpp-python 0.3.36 as built here segfaults in
decode on any quantized file with them on (ggml-org/llama.cpp#20824, seen on this Sapphire-Rapids-class
Xeon); the plain CPU kernels compute the same products."""
from __future__ import annotations

from pathlib import Path


def llama_model(path: str | Path, **kw):
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)
    finally:
        lib.llama_model_default_params = default
