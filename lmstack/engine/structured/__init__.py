"""Structured output: constrained decoding to a JSON schema, json_object, regex, choice or grammar.

params.py   StructuredOutputsParams (vLLM's names) and its validation (plain Python)
grammar.py  compiling a constraint with llguidance (cached) into per-sequence matchers
mask.py     filling the allowed-token bitmask of a batch's constrained rows, applying it to logits
"""
from lmstack.engine.structured.params import (CONSTRAINT_FIELDS, GUIDED_FIELDS, StructuredOutputError,
                                              StructuredOutputsParams)

__all__ = ["StructuredOutputsParams", "StructuredOutputError", "CONSTRAINT_FIELDS", "GUIDED_FIELDS"]
