"""Model core vs HF transformers on tiny random checkpoints of every supported family."""
from __future__ import annotations

import json

import pytest
import torch

from lmstack.checkpoint.safetensors_io import CheckpointError
from lmstack.config import ConfigError, ModelConfig
from lmstack.generate import generate
from lmstack.model.attention import DenseMeta
from lmstack.model.loading import load_model, save_model
from tests.fixtures import FAMILIES, make_tiny_hf

PROMPTS = [[5, 17, 33, 8, 120, 99, 4], [250, 3], list(range(10, 50)), [77] * 13]


def _padded(prompts, pad_id=0):
    """Left-padded batch + mask + positions, the way HF batches prompts for generation."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_padded_batch(family, tmp_path):
    hf = make_tiny_hf(family, tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    ids, mask, pos = _padded(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = model.compute_logits(model(ids, pos, meta=DenseMeta(mask.bool())))
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, tmp_path):
    hf = make_tiny_hf(family, tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    for p in PROMPTS[:2]:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        ours = generate(model, [p], max_new_tokens=32)[0]
        assert ours == ref
    # batched (left-padded) generation gives each row what it gets alone
    batched = generate(model, PROMPTS, max_new_tokens=12)
    for p, b in zip(PROMPTS, batched):
        assert b == generate(model, [p], max_new_tokens=12)[0]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_save_then_transformers_loads_same_logits(family, tmp_path):
    make_tiny_hf(family, tmp_path / "src")
    model = load_model(tmp_path / "src", dtype=torch.float32)
    save_model(model, tmp_path / "out")
    import transformers as tf

    hf2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = hf2(ids).logits
        out = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "src")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = load_model(tmp_path / "src", dtype=torch.float32)
    b = load_model(tmp_path / "sharded", dtype=torch.float32)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    # and lmstack's own sharded writer round-trips
    save_model(b, tmp_path / "ours", max_shard_bytes=30_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    c = load_model(tmp_path / "ours", dtype=torch.float32)
    for (n, p), (_, q) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(p, q), n


def test_bf16_close_to_transformers_bf16(tmp_path):
    hf = make_tiny_hf("qwen2", tmp_path, dtype=torch.bfloat16)
    model = load_model(tmp_path)  # auto dtype -> bf16 from config.json
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = hf(ids).logits.float()
        out = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None])).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_rope_scaling_types_match_transformers(tmp_path):
    import transformers as tf

    for i, scaling in enumerate([{"rope_type": "linear", "factor": 2.0},
                                 {"rope_type": "dynamic", "factor": 2.0},
                                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}]):
        d = tmp_path / str(i)
        hf = make_tiny_hf("llama", d, rope_scaling=scaling)
        model = load_model(d, dtype=torch.float32)
        ids = torch.tensor([list(range(3, 83))])  # 80 tokens: past the "original" context
        with torch.no_grad():
            ref = hf(ids).logits
            out = model.compute_logits(model(ids, torch.arange(80)[None]))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=str(scaling))


# ------------------------------------------------------------------------------------- bad input
def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ConfigError, match="BertModel.*not supported"):
        load_model(tmp_path)


def test_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf(tmp_path)


def test_misshaped_and_missing_tensor(tmp_path):
    make_tiny_hf("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\..*_proj.weight.*shape"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_tiny_hf("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)


def test_prompt_longer_than_context(tmp_path):
    make_tiny_hf("llama", tmp_path, max_position_embeddings=64)
    model = load_model(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [list(range(3, 60))], max_new_tokens=10)


def test_loading_peak_rss_below_1_5x_weights(tmp_path):
    """Memory-mapped loading: the process never holds the weights twice."""
    import subprocess
    import sys

    from lmstack.model.transformer import Transformer

    cfg = ModelConfig(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1376,
                      num_layers=6, num_heads=8, num_kv_heads=8)
    model = Transformer(cfg)
    save_model(model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    del model
    child = (
        "import resource, sys, torch\n"
        "from lmstack.model.loading import load_model\n"
        "torch.zeros(1)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = load_model({str(tmp_path)!r}, dtype=torch.float32)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((peak - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 1.5 * size, f"loading {size / 2**20:.0f} MiB of weights raised peak RSS by {extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("bias", [False, True])
def test_inference_linear_matches_f_linear_and_training_path_has_grads(bias):
    """The model's Linear takes oneDNN's inner product for CPU fp32 inference: same values as F.linear
    on (B, T, K) inputs; with grad enabled it must stay on the autograd path."""
    from lmstack.model.layers import Linear

    torch.manual_seed(0)
    lin = Linear(96, 200, bias=bias)
    x = torch.randn(3, 7, 96)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        out = lin(x)
        assert out.shape == (3, 7, 200)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert lin(x[:, :0]).shape == (3, 0, 200)  # empty batch
    y = lin(x)
    y.square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fused_projections_same_logits_and_follow_live_weights(family, tmp_path):
    """fuse_projections runs q/k/v and gate/up as one matmul at inference. The Parameters keep their
    identity and names, in-place updates reach the fused weight, and anything that replaces a member
    (LoRA swap) or its storage (.to(dtype)) falls back to the separate modules, never stale weights."""
    from lmstack.model.layers import fuse_projections
    from lmstack.model.lora import LoraSpec, apply_lora

    make_tiny_hf(family, tmp_path / "hf")
    model = load_model(tmp_path / "hf").eval()
    tokens = torch.tensor([PROMPTS[2]])
    pos = torch.arange(tokens.shape[1])[None]

    def logits(m):
        with torch.no_grad():
            return m.compute_logits(m(tokens, pos))

    ref = logits(model)
    params = dict(model.named_parameters())
    assert fuse_projections(model) == model.config.num_layers * (2 if model.config.gated_mlp else 1)
    assert dict(model.named_parameters()) == params  # same names, same Parameter objects
    attn = model.model.layers[0].self_attn
    assert attn._fused_qkv.intact()
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # an optimizer step is an in-place update of the Parameter
        attn.k_proj.weight.mul_(1.5)
    assert attn._fused_qkv.intact()
    changed = logits(model)
    attn._fused_qkv._ptrs = []  # force the separate-module path for the reference
    torch.testing.assert_close(changed, logits(model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, ref)

    save_model(model, tmp_path / "saved")  # slices of one storage still save (safetensors refuses shared memory)
    torch.testing.assert_close(logits(load_model(tmp_path / "saved").eval()), changed, rtol=1e-5, atol=1e-5)

    fused = load_model(tmp_path / "hf").eval()
    fuse_projections(fused)
    apply_lora(fused, LoraSpec(r=4, target_modules="all-linear"))
    assert not fused.model.layers[0].self_attn._fused_qkv.intact()
    torch.testing.assert_close(logits(fused), ref, rtol=1e-5, atol=1e-5)  # zero-init adapters
    fused.to(torch.float64)  # new storage: the fused weight would be stale
    assert not fused.model.layers[0].self_attn._fused_qkv.intact()
    torch.testing.assert_close(logits(fused).float(), ref, rtol=1e-4, atol=1e-4)
