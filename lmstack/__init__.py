"""lmstack: one small PyTorch codebase for the whole life of a language model."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):  # lazy: `import lmstack` stays cheap and torch-free
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from lmstack.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from lmstack.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
