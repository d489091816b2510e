"""Tiny random HF checkpoints made with transformers (the reference), for tests only."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "phi3", "gpt2")
HEAD_HALF = 8  # head_dim 16 / 2: the number of LongRoPE factors of the tiny phi3


def longrope(orig: int = 64) -> dict:
    """Phi-3's LongRoPE scaling with distinct short and long factors (len = head_dim / 2)."""
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HEAD_HALF)],
            "long_factor": [1.5 + 0.4 * i for i in range(HEAD_HALF)], "original_max_position_embeddings": orig}


def hf_config(family: str, vocab_size: int = 320, **over):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        c = tf.LlamaConfig(**{**common, **over})
    elif family == "llama3":  # Llama 3.x rope scaling, MQA
        kw = {**common, "num_key_value_heads": 1, "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
              "rope_theta": 500000.0}
        c = tf.LlamaConfig(**{**kw, **over})
    elif family == "qwen2":
        c = tf.Qwen2Config(**{**common, "tie_word_embeddings": True, **over})
    elif family == "qwen3":
        c = tf.Qwen3Config(**{**common, "head_dim": 32, **over})
    elif family == "mistral":
        c = tf.MistralConfig(**{**common, "sliding_window": 8, **over})
    elif family == "phi3":  # fused qkv / gate_up weights, LongRoPE (attention factor != 1), a sliding window
        kw = {**common, "rope_parameters": {"rope_theta": 10000.0, **longrope()},
              "original_max_position_embeddings": 64, "sliding_window": 48}
        c = tf.Phi3Config(**{**kw, **over})
    elif family == "gpt2":
        c = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=1, eos_token_id=2, **over)
    else:
        raise ValueError(family)
    return c


def make_tiny_hf(family: str, out_dir: str | Path, seed: int = 0, dtype=torch.float32, vocab_size: int = 320,
                 **over):
    """Builds a random transformers model of `family`, saves it to out_dir, returns the HF model."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_size=vocab_size, **over)
    cls = {"gpt2": tf.GPT2LMHeadModel, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
           "mistral": tf.MistralForCausalLM, "phi3": tf.Phi3ForCausalLM}.get(family, tf.LlamaForCausalLM)
    model = cls(cfg).to(dtype).eval()
    # Random weights are tiny by default init; scale the norms so attention/logits are not all flat.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n or n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return model
