"""lmstack's inference engine: paged KV cache, prefix caching, continuous batching, chunked prefill.

Names are exported lazily so that the plain-Python parts (sequence, block_manager, scheduler,
sampling_params) import without torch.
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineStats"]


def __getattr__(name: str):
    if name == "SamplingParams":
        from lmstack.engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput", "EngineStats"):
        from lmstack.engine import outputs

        return getattr(outputs, name)
    if name == "LLM":
        from lmstack.engine.llm import LLM

        return LLM
    raise AttributeError(name)
