"""The engine's one-call C++ decode step (engine/model_runner.py CppDecode, csrc/decode_layers.cpp) against the eager
forward it replaces: the same decode step run both ways must give bit-identical logits, in every linear
mode (fp32 oneDNN, packed bf16, bf16 linears under an fp32 model), with biases, GQA and a sliding window.
Models the C++ loop does not compute (LoRA swaps, GPT-2) must take the eager path."""
from __future__ import annotations

import pytest
import torch

from lmstack import cpu_kernels
from lmstack.config import ModelConfig
from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.model import layers
from lmstack.model.transformer import Transformer


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if cpu_kernels.load() is None:
        pytest.skip("the C++ kernels could not be built here (no compiler?); the engine uses its PyTorch path")


def tiny(**over) -> Transformer:
    cfg = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
               max_position_embeddings=512, eos_token_id=0)
    cfg.update(over)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**cfg))
    m.init_weights(0.2)  # larger than the default so logits are not flat
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:  # norm weights and biases away from 1 / 0
                p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def decode_steps_both_ways(llm: LLM, prompts: list[list[int]], steps: int = 4) -> int:
    """Generate with the engine; on every pure-decode step also run the eager path on the same inputs and
    compare logits exactly (the K/V written twice is the same data in the same slots). Returns how many
    steps were compared."""
    runner = llm.runner
    execute, cpp = runner.execute, runner.cpp_decode
    compared = 0

    def both(token_ids, starts, block_tables, sample_mask):
        nonlocal compared
        fast = execute(token_ids, starts, block_tables, sample_mask)
        if all(len(t) == 1 for t in token_ids):
            runner.cpp_decode = None
            try:
                eager = execute(token_ids, starts, block_tables, sample_mask)
            finally:
                runner.cpp_decode = cpp
            assert fast.dtype == eager.dtype
            assert torch.equal(fast, eager), (fast.float() - eager.float()).abs().max()
            compared += 1
        return fast

    runner.execute = both
    try:
        before = cpp.steps
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
        assert cpp.steps - before == compared  # every compared step really went through C++
    finally:
        runner.execute = execute
    return compared


PROMPTS = [[5, 6, 7], list(range(1, 40)), [9] * 17, list(range(100, 131))]


@pytest.mark.parametrize("model_dtype,engine_dtype", [
    (torch.float32, "float32"),    # oneDNN fp32 linears
    (torch.bfloat16, "bfloat16"),  # packed bf16 linears (where oneDNN has bf16)
    (torch.float32, "bfloat16"),   # fp32 model, bf16 linears and K/V (RL rollouts)
])
@pytest.mark.parametrize("over", [
    dict(),
    dict(model_type="qwen2", qkv_bias=True, num_kv_heads=1),  # MQA + q/k/v bias
    dict(sliding_window=8, o_bias=True, mlp_bias=True, tie_embeddings=True),
    dict(model_type="qwen3", qk_norm=True, head_dim=32),  # per-head q/k RMSNorm; head_dim != hidden / heads
], ids=["llama-gqa", "qwen2-bias-mqa", "window-biases", "qwen3-qk-norm"])
def test_cpp_decode_equals_eager_forward(model_dtype, engine_dtype, over):
    if engine_dtype == "bfloat16" and not layers.bf16_packing_supported():
        pytest.skip("no native bf16 oneDNN path on this CPU")
    m = tiny(**over).to(model_dtype)
    llm = LLM.from_model(m, dtype=engine_dtype, block_size=8, num_kv_blocks=64)
    assert llm.runner.cpp_decode.plan() is not None
    assert decode_steps_both_ways(llm, PROMPTS) >= 3


def test_models_it_does_not_compute_take_the_eager_path():
    from lmstack.model.lora import LoraSpec, apply_lora

    m = tiny()
    llm = LLM.from_model(m, dtype="float32", block_size=8, num_kv_blocks=64)
    cpp = llm.runner.cpp_decode
    assert cpp.plan() is not None
    apply_lora(m, LoraSpec(r=2, target_modules=["q_proj", "down_proj"]))
    assert cpp.plan() is None  # swapped modules: the fused weights no longer describe the model
    before = cpp.steps
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert cpp.steps == before
    gpt2 = dict(model_type="gpt2", pos="learned", norm="layer", act="gelu_new", gated_mlp=False)
    llm = LLM.from_model(tiny(**gpt2), dtype="float32", block_size=8, num_kv_blocks=64)
    assert llm.runner.cpp_decode.plan() is None


def test_a_failing_cpp_step_falls_back_to_the_eager_forward(monkeypatch, caplog):
    m = tiny()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = LLM.from_model(m, dtype="float32", block_size=8, num_kv_blocks=64).generate(PROMPTS, params)
    llm = LLM.from_model(m, dtype="float32", block_size=8, num_kv_blocks=64)

    def broken(*args):
        raise RuntimeError("simulated failure inside the C++ loop")

    monkeypatch.setattr(cpu_kernels, "decode_layers", broken)
    with caplog.at_level("WARNING"):
        got = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert llm.runner.cpp_decode is None
    assert sum("C++ decode step failed (simulated failure" in r.message for r in caplog.records) == 1


def test_plan_is_cached_until_the_model_changes():
    from lmstack.model.layers import RMSNorm

    dt, name = (torch.bfloat16, "bfloat16") if layers.bf16_packing_supported() else (torch.float32, "float32")
    m = tiny().to(dt)
    llm = LLM.from_model(m, dtype=name, block_size=8, num_kv_blocks=64)
    cpp = llm.runner.cpp_decode
    p1 = cpp.plan()
    assert p1 is not None and cpp.plan() is p1
    with torch.no_grad():  # an optimizer step: in place, same storage
        m.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    p2 = cpp.plan()
    assert p2 is not p1 and cpp.plan() is p2
    assert decode_steps_both_ways(llm, PROMPTS) >= 3  # the packed copy followed the update
    with torch.no_grad():  # a write no version counter sees: LLM.reset_cache is the documented way to say so
        m.model.layers[2].self_attn.o_proj.weight.data.mul_(0.5)
    assert cpp.plan() is p2
    llm.reset_cache()
    p2 = cpp.plan()
    assert decode_steps_both_ways(llm, PROMPTS) >= 3
    norm = RMSNorm(64, m.config.norm_eps).to(dt)
    m.model.layers[0].input_layernorm = norm  # a swapped module
    p3 = cpp.plan()
    assert p3 is not p2 and p3.in_norm[0] is norm.weight
    assert decode_steps_both_ways(llm, PROMPTS) >= 3
