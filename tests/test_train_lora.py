"""LoRA / QLoRA: zero-init no-op, merge == unmerged, PEFT interop, export, errors, QLoRA training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.config import ConfigError
from lmstack.model.loading import load_model
from lmstack.model.lora import (LoRALinear, LoraSpec, apply_lora, load_adapter, lora_modules, merge_lora,
                                save_adapter)
from tests.fixtures import make_tiny_hf
from tests.train_fixtures import base_cfg, make_model_dir, sft_rows, write_jsonl, one_thread  # noqa: F401 (autouse fixture)

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 250], [3, 4, 5, 6, 7, 8, 9, 10]])
POS = torch.arange(8).expand(2, 8)


def _logits(model):
    with torch.no_grad():
        return model.compute_logits(model(TOKENS, POS)).float()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "llama"
    make_tiny_hf("llama", d, seed=0)
    return d


def test_zero_init_is_a_noop_and_only_adapters_train(hf_dir):
    model = load_model(hf_dir)
    ref = _logits(model)
    names = apply_lora(model, LoraSpec(r=4, alpha=8, target_modules="all-linear"))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)  # 7 projections per layer
    assert torch.equal(_logits(model), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(m.lora_B.weight.abs().sum() == 0 for m in lora_modules(model).values())


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(hf_dir, rslora):
    model = load_model(hf_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora))
    m = next(iter(lora_modules(model).values()))
    assert m.scaling == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)
    _randomize(model)
    unmerged = _logits(model)
    assert not torch.allclose(unmerged, _logits(load_model(hf_dir)))  # the adapter does something
    merge_lora(model)
    assert not lora_modules(model) and isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_adapter_with_the_same_logits(hf_dir, tmp_path, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(hf_dir)
    apply_lora(model, LoraSpec(r=4, alpha=16, target_modules="all-linear", use_rslora=rslora))
    _randomize(model, seed=2)
    ours = _logits(model)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(hf_dir))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = peft(input_ids=TOKENS).logits.float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # ... and lmstack loads it back
    again = load_adapter(load_model(hf_dir), tmp_path / "ad")
    torch.testing.assert_close(_logits(again), ours, atol=1e-6, rtol=1e-6)


def test_target_matching_nothing_lists_available_modules(hf_dir):
    model = load_model(hf_dir)
    with pytest.raises(ConfigError, match=r"matches no module; available.*q_proj"):
        apply_lora(model, LoraSpec(target_modules=["query"]))
    with pytest.raises(ConfigError, match="'qproj' matches no module"):
        apply_lora(model, LoraSpec(target_modules=["q_proj", "qproj"]))


def test_lora_wraps_any_linear_like_base():
    class Doubler(torch.nn.Module):  # not an nn.Linear: only base(x) and in/out_features exist
        in_features, out_features = 6, 6

        def forward(self, x):
            return 2 * x

    torch.manual_seed(0)
    m = LoRALinear(Doubler(), r=2, alpha=2)
    x = torch.randn(3, 6)
    assert torch.equal(m(x), 2 * x)
    torch.nn.init.normal_(m.lora_B.weight)
    torch.testing.assert_close(m(x), 2 * x + x @ (m.lora_B.weight @ m.lora_A.weight).T)


def test_export_merged_loads_in_transformers(hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmstack.train.export import export_merged

    model = load_model(hf_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    _randomize(model, seed=3)
    save_adapter(model, tmp_path / "ad", str(hf_dir))
    export_merged(hf_dir, tmp_path / "ad", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                                     tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, peft(input_ids=TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_qlora_trains_with_frozen_nf4_base_and_exports(tmp_path):
    from safetensors.torch import load_file

    from lmstack.model.quant import NF4Linear, quantize_model
    from lmstack.train.config import load_config
    from lmstack.train.export import export_merged
    from lmstack.train.loop import train

    md = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    raw = base_cfg(md, data, tmp_path / "run", max_steps=8, batch_size=8, precision="bf16")
    raw["optim"] = {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}
    raw["lora"] = {"r": 8, "alpha": 16, "qlora": True}
    res = train("sft", load_config(raw=raw, stage="sft"))
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    # The whole dataset is the batch at every step: the loss must fall steadily.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    ckpt = load_file(str(next((tmp_path / "run" / "checkpoints").iterdir()) / "trainable.safetensors"))
    assert ckpt and all(".lora_A." in k or ".lora_B." in k for k in ckpt)  # the base never trained
    assert json.loads((res.final_dir / "lmstack_adapter.json").read_text())["qlora"] is True

    # The trained QLoRA model (NF4 base + adapter) vs its bf16 merged export.
    q = load_model(md)
    quantize_model(q, "nf4", skip=("lm_head",))
    assert isinstance(q.model.layers[0].mlp.up_proj, NF4Linear)
    load_adapter(q, res.final_dir)
    export_merged(md, res.final_dir, tmp_path / "merged")
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    toks = torch.tensor([[5, 9, 33, 2, 7, 100, 250, 11]])
    pos = torch.arange(8)[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = q.compute_logits(q(toks, pos)).float()
        b = merged.compute_logits(merged(toks, pos)).float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_quantized_base_path_matches_calling_the_base():
    """LoRALinear's memory-saving path for an NF4 base gives the base's own output and gradients."""
    from lmstack.model.quant import NF4Linear

    torch.manual_seed(0)
    m = LoRALinear(NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=True)), r=4, alpha=8)
    torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = m(x)
    gx, gb = torch.autograd.grad(y.square().sum(), (x, m.lora_B.weight))
    m._quantized_base = False  # plain call of the base
    y2 = m(x)
    gx2, gb2 = torch.autograd.grad(y2.square().sum(), (x, m.lora_B.weight))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gb, gb2)


def test_qlora_with_nf4_embeddings_trains_and_exports(tmp_path):
    """lora.quantize_embeddings: the tied embedding / LM head are NF4 too (one copy of the codes), the
    loss (through the vocabulary-chunked quantized head) falls, and the bf16 export reproduces the
    trained model, embedding quantization included."""
    from lmstack.model.quant import NF4Embedding, NF4Linear, quantize_embeddings_nf4, quantize_model
    from lmstack.train.config import load_config
    from lmstack.train.export import export_merged
    from lmstack.train.loop import _prepare_model, build_model, train

    md = make_model_dir(tmp_path, family="qwen2")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    raw = base_cfg(md, data, tmp_path / "run", max_steps=8, batch_size=8, precision="bf16")
    raw["optim"] = {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}
    raw["lora"] = {"r": 8, "alpha": 16, "qlora": True, "quantize_embeddings": True}
    cfg = load_config(raw=raw, stage="sft")
    probe = build_model(cfg, None, torch.device("cpu"), torch.bfloat16)
    _prepare_model(cfg, probe)
    assert isinstance(probe.model.embed_tokens, NF4Embedding) and isinstance(probe.lm_head, NF4Linear)
    assert probe.lm_head.weight_codes.data_ptr() == probe.model.embed_tokens.weight_codes.data_ptr()
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 2 for p in probe.parameters())  # no 16-bit matrix left
    res = train("sft", cfg)
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    assert json.loads((res.final_dir / "lmstack_adapter.json").read_text())["quantize_embeddings"] is True

    q = load_model(md)
    quantize_model(q, "nf4", skip=("lm_head",))
    quantize_embeddings_nf4(q)
    load_adapter(q, res.final_dir)
    export_merged(md, res.final_dir, tmp_path / "merged")
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    toks, pos = torch.tensor([[5, 9, 33, 2, 7, 100, 250, 11]]), torch.arange(8)[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = q.compute_logits(q(toks, pos)).float()
        b = merged.compute_logits(merged(toks, pos)).float()
    # 0.4% measured (bf16 merge rounding); merging into the unquantized embedding gives 5%
    assert (a - b).abs().max() < 0.015 * a.abs().max()


def test_quantize_embeddings_needs_qlora(tmp_path):
    from lmstack.train.config import load_config

    raw = base_cfg(tmp_path, tmp_path / "x.jsonl", tmp_path / "run")
    raw["lora"] = {"r": 8, "quantize_embeddings": True}
    with pytest.raises(ConfigError, match="quantize_embeddings: true needs lora.qlora: true"):
        load_config(raw=raw, stage="sft")
