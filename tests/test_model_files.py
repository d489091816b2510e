"""Malformed model files are refused before anything is allocated, with the file and the problem named:
config.json field types and bounds, sizes that cannot fit in memory, safetensors headers that lie,
missing or misshapen tensors, tokenizer files that are not JSON."""
from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch

from lmstack.checkpoint.safetensors_io import CheckpointError, read_safetensors_header
from lmstack.config import ACTIVATIONS, MAX_POSITIONS, ConfigError, ModelConfig
from lmstack.model.layers import _ACTS
from lmstack.model.loading import load_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer, TokenizerError
from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_hf("llama", d)
    return d


@pytest.fixture
def model_dir(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def _write_safetensors(path, header: dict | list | str, data: bytes = b"", n: int | None = None):
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


# ------------------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("key,value,problem", [
    ("hidden_size", "64", 'must be an integer, got "64" (str)'),
    ("hidden_size", 64.0, "must be an integer, got 64.0 (float)"),
    ("vocab_size", 1e12, "must be an integer, got 1000000000000.0 (float)"),
    ("num_hidden_layers", True, "must be an integer, got true (bool)"),
    ("num_attention_heads", 0, "must be positive, got 0"),
    ("intermediate_size", -128, "must be positive, got -128"),
    ("num_key_value_heads", [2], "must be an integer, got list"),
    ("head_dim", -16, "must be >= 0, got -16"),
    ("max_position_embeddings", 10**12, f"over lmstack's limit of {MAX_POSITIONS}"),
    ("max_position_embeddings", 1e12, "must be an integer"),
    ("rms_norm_eps", "1e-6", "must be a number"),
    ("rope_parameters", {"rope_theta": float("nan")}, "rope_parameters.rope_theta must be a number, got NaN"),
    ("rope_parameters", {"rope_theta": -1.0}, "rope_theta must be positive"),
    ("rope_parameters", "default", "must be a JSON object"),
    ("tie_word_embeddings", "false", "must be true or false"),
    ("attention_bias", 1, "must be true or false, got 1 (int)"),
    ("rope_scaling", [8.0], "must be a JSON object, got list"),
    ("rope_scaling", {"rope_type": "linear", "factor": "8"}, "rope_scaling.factor must be a number"),
    ("rope_scaling", {"rope_type": "linear"}, "needs a positive factor"),
    ("eos_token_id", "2", "must be an integer or a list of integers"),
    ("bos_token_id", 1.5, "must be an integer"),
    ("architectures", "LlamaForCausalLM", "must be a JSON list"),
    ("architectures", [{"x": 1}], "architectures[0] must be a string"),
    ("torch_dtype", 16, "must be a string"),
    ("sliding_window", 0, "must be positive"),
    ("quantization_config", ["int8"], "quantization_config must be a JSON object"),
])
def test_config_field_errors_name_the_file_and_field(model_dir, key, value, problem):
    path = _edit_config(model_dir, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_model(model_dir)
    msg = str(e.value)
    assert str(path) in msg and problem in msg, msg
    assert key in msg or "rope_theta" in msg


@pytest.mark.parametrize("content,problem", [
    ("[1, 2, 3]", "expected a JSON object, got a JSON list"),
    ('{"hidden_size": 64', "invalid JSON"),
    ("", "empty file"),
    ("\xff\xfe{}", "invalid JSON"),
])
def test_config_json_that_is_not_an_object(model_dir, content, problem):
    (model_dir / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(e.value)


def test_every_bench_model_config_still_parses():
    """Real configs (Qwen2.5, SmolLM2) pass the stricter checks unchanged."""
    from pathlib import Path

    root = Path("/work/shared/bench_models")
    configs = sorted(root.glob("*/config.json")) if root.is_dir() else []
    for p in configs:
        cfg = ModelConfig.from_hf(p.parent)
        assert cfg.num_parameters() > 1e8
    if not configs:
        pytest.skip("no bench_models folder on this machine")


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
    ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, qkv_bias=True, tie_embeddings=True),
    ModelConfig(model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=3,
                num_heads=4, num_kv_heads=1, head_dim=32, qk_norm=True, o_bias=True, mlp_bias=True),
    ModelConfig(model_type="gpt2", vocab_size=320, hidden_size=64, intermediate_size=256, num_layers=2,
                num_heads=4, num_kv_heads=4, pos="learned", norm="layer", act="gelu_new", gated_mlp=False,
                qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True, max_position_embeddings=128),
    ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                head="score", num_labels=3),
], ids=["llama", "qwen2-tied-bias", "qwen3-qknorm-biases", "gpt2", "reward-head"])
def test_num_parameters_from_the_config_equals_the_built_model(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("changes", [{"vocab_size": 10**12}, {"hidden_size": 2**20, "intermediate_size": 2**22}])
def test_a_model_that_cannot_fit_in_memory_is_refused_with_its_size(model_dir, changes):
    _edit_config(model_dir, head_dim=16, **changes)
    with pytest.raises(ConfigError) as e:
        load_model(model_dir, dtype="float32")
    msg = str(e.value)
    n = ModelConfig.from_hf(model_dir).num_parameters()
    assert f"{n:,} parameters in float32" in msg and "available: refusing" in msg
    assert str(model_dir / "config.json") in msg


def test_training_from_scratch_refuses_a_model_too_large_for_memory(tmp_path):
    from lmstack.train.config import load_config
    from lmstack.train.loop import build_model

    tok_dir = build_test_tokenizer(tmp_path / "tok", "chatml")
    raw = {"model": {"tokenizer": tok_dir, "init": {"hidden_size": 2**20, "num_layers": 2**10, "num_heads": 2**10}},
           "data": {"train": ["unused.jsonl"]}, "training": {"device": "cpu", "out_dir": str(tmp_path / "run")}}
    cfg = load_config(raw=raw, stage="pretrain")
    with pytest.raises(ConfigError, match=r"model\.init: [\d,]+ parameters in float32 need [\d,.]+ TiB"):
        build_model(cfg, Tokenizer.from_dir(tok_dir), torch.device("cpu"))


def test_config_activations_are_the_ones_the_model_implements():
    assert set(ACTIVATIONS) == set(_ACTS)


# ------------------------------------------------------------------------------------------ safetensors
def _tensor_header(shape=(2, 3), dtype="F32", offsets=(0, 24)):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.write_bytes(b""), "file is empty (0 bytes)"),
    (lambda p: p.write_bytes(b"\x01\x00"), "file is truncated (2 bytes"),
    (lambda p: _write_safetensors(p, "{}", n=2**62), "over the format's limit"),
    (lambda p: _write_safetensors(p, "{}", n=4096), "runs past the end of the file"),
    (lambda p: _write_safetensors(p, "[1, 2]"), "a JSON list, not an object"),
    (lambda p: _write_safetensors(p, "{not json"), "corrupt safetensors header"),
    (lambda p: _write_safetensors(p, _tensor_header(dtype="F99"), bytes(24)), "unsupported dtype 'F99'"),
    (lambda p: _write_safetensors(p, _tensor_header(shape=(2, -3)), bytes(24)), "not a list of non-negative integers"),
    (lambda p: _write_safetensors(p, _tensor_header(shape=(2, 3.0)), bytes(24)), "not a list of non-negative integers"),
    (lambda p: _write_safetensors(p, _tensor_header(offsets=(24, 0)), bytes(24)), "two increasing"),
    (lambda p: _write_safetensors(p, _tensor_header(shape=(4, 3)), bytes(24)), "hold 24 bytes, but dtype F32 x shape [4, 3] needs 48"),
    (lambda p: _write_safetensors(p, _tensor_header(shape=(2**40, 2**40), offsets=(0, 2**82)), bytes(24)),
     "needs bytes up to"),
    (lambda p: _write_safetensors(p, _tensor_header(), bytes(12)), "needs bytes up to"),
    (lambda p: _write_safetensors(p, _tensor_header(), bytes(30)), "6 bytes after the last tensor"),
    (lambda p: _write_safetensors(p, {**_tensor_header(), "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                                  bytes(24)), "overlaps the previous tensor"),
    (lambda p: _write_safetensors(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
     "a hole before it"),
    (lambda p: _write_safetensors(p, {"__metadata__": {"format": 1}}), "__metadata__ must map strings"),
], ids=["empty", "tiny", "header-2^62", "header-past-end", "header-list", "header-not-json", "dtype", "shape-negative",
        "shape-float", "offsets-reversed", "offsets-vs-shape", "huge-shape", "data-truncated", "trailing-bytes",
        "overlap", "hole", "metadata"])
def test_a_safetensors_header_that_lies_is_named(tmp_path, make, problem):
    p = tmp_path / "model.safetensors"
    make(p)
    with pytest.raises(CheckpointError, match=re.escape(problem)) as e:
        read_safetensors_header(p)
    assert str(p) in str(e.value)


def test_zero_length_weights_are_named_when_loading(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{model_dir / 'model.safetensors'}: file is empty")):
        load_model(model_dir)


def test_missing_and_misshapen_tensors_are_refused_before_allocation(model_dir, monkeypatch):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(model_dir / "model.safetensors"))
    allocations = []
    monkeypatch.setattr(Transformer, "to_empty", lambda self, **kw: allocations.append(kw) or self)
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir)
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(65,\), expected \(64,\)"):
        load_model(model_dir)
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.bool)
    save_file(sd, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype bool"):
        load_model(model_dir)
    assert allocations == []  # every refusal came from the headers, before the model was materialized


def test_sharded_index_errors_are_named(model_dir):
    index = model_dir / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: invalid index file")):
        load_model(model_dir)
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="is not a file name"):
        load_model(model_dir)
    index.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map must map"):
        load_model(model_dir)


# ------------------------------------------------------------------------------------------ tokenizer files
@pytest.mark.parametrize("name,content,problem", [
    ("tokenizer.json", "not json", "cannot be loaded by the tokenizers library"),
    ("tokenizer.json", "", "cannot be loaded by the tokenizers library"),
    ("tokenizer_config.json", "[]", "expected a JSON object, got a JSON list"),
    ("tokenizer_config.json", "", "empty file"),
    ("tokenizer_config.json", "{'a': 1}", "invalid JSON"),
    ("generation_config.json", "\xff\xfe", "invalid JSON"),
    ("chat_template.jinja", "\xff\xfe{{ x }}", "not UTF-8 text"),
])
def test_tokenizer_file_errors_name_the_file(tmp_path, name, content, problem):
    d = build_test_tokenizer(tmp_path / "tok", "chatml")
    (tmp_path / "tok" / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(TokenizerError, match=re.escape(problem)) as e:
        Tokenizer.from_dir(d)
    assert str(tmp_path / "tok" / name) in str(e.value)


def test_adapter_file_errors_name_the_file(tmp_path):
    from lmstack.model.lora import load_adapter

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("[]")
    with pytest.raises(ConfigError, match=re.escape(f"{d / 'adapter_config.json'}: expected a JSON object")):
        load_adapter(torch.nn.Linear(2, 2), d)
    (d / "adapter_config.json").write_text(json.dumps({"r": "8", "target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError, match=re.escape('r must be an integer, got "8"')):
        load_adapter(torch.nn.Linear(2, 2), d)
