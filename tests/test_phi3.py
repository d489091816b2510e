"""Phi-3 (Phi3ForCausalLM) against transformers: fused qkv_proj / gate_up_proj checkpoint names split on
load and fused on save, LongRoPE's short factors inside the trained context and long ones beyond it
(with its attention factor), the sliding window, the paged engine (and its C++ decode loop) greedy in
both regimes. The shared family tests (tests/test_model.py) cover the padded batch."""
from __future__ import annotations

import json

import pytest
import torch

from lmstack.config import ConfigError, ModelConfig
from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.model.loading import load_model, save_model
from tests.fixtures import make_tiny_hf

ORIG = 64  # the tiny model's original_max_position_embeddings


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi3")
    return make_tiny_hf("phi3", d, initializer_range=0.3), d  # larger weights: logits depend on position


@pytest.mark.parametrize("T", [ORIG, ORIG + 1, 150])
def test_logits_short_and_long_factors(phi3, T):
    hf, d = phi3
    model = load_model(d, dtype=torch.float32)
    ids = torch.randint(3, 320, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model.compute_logits(model(ids, torch.arange(T)[None]))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_the_long_factors_matter(phi3):
    """The check above would pass by accident if short and long factors gave the same logits."""
    _, d = phi3
    model = load_model(d, dtype=torch.float32)
    ids = torch.arange(3, 103)[None]
    with torch.no_grad():
        a = model.compute_logits(model(ids, torch.arange(100)[None]))
        model.rotary.long_inv_freq.copy_(model.rotary.inv_freq)
        b = model.compute_logits(model(ids, torch.arange(100)[None]))
    assert (a - b).abs().max() > 1e-2


def test_save_writes_fused_names_transformers_loads(phi3, tmp_path):
    import transformers as tf
    from safetensors import safe_open

    hf, d = phi3
    model = load_model(d, dtype=torch.float32)
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith(("q_proj.weight", "up_proj.weight")) and "gate_up" not in n for n in names)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["original_max_position_embeddings"] == ORIG and cfg["sliding_window"] == 48
    hf2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.arange(5, 105)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf2(ids).logits, hf(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_prompt,n_new", [(20, 40), (70, 20)])  # all short factors / all long factors
def test_engine_greedy_equals_transformers(phi3, n_prompt, n_new):
    """Within the trained context and wholly beyond it. A sequence that crosses position 64 while
    decoding is where transformers' generate drops its cache and recomputes everything with the long
    factors; the engine, like vLLM, keeps the keys it has (README: Supported model families)."""
    hf, d = phi3
    prompt = list(range(10, 10 + n_prompt))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(d, dtype="float32", block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref


def test_unsupported_phi3_configs_are_named(phi3):
    _, d = phi3
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.75"):
        ModelConfig.from_hf_dict({**cfg, "partial_rotary_factor": 0.75, "rope_parameters": {
            **cfg["rope_parameters"], "partial_rotary_factor": 0.75}})
    bad = {**cfg["rope_parameters"], "long_factor": "x"}
    with pytest.raises(ConfigError, match="long_factor"):
        ModelConfig.from_hf_dict({**cfg, "rope_parameters": bad})
