"""Training config: YAML -> dataclasses, overrides with type coercion, and the bad-input errors."""
from __future__ import annotations

import argparse

import pytest
import yaml

from lmstack.config import ConfigError
from lmstack.train.config import load_config
from lmstack.train.loop import train
from tests.train_fixtures import base_cfg, make_model_dir, sft_rows, write_jsonl, one_thread  # noqa: F401


def _yaml(tmp_path, raw, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


MIN = {"model": {"path": "m"}, "data": {"train": ["d.jsonl"]}}


def test_overrides_are_typed(tmp_path):
    cfg = load_config(_yaml(tmp_path, MIN), ["optim.lr=1e-4", "training.batch_size=16", "training.precision=bf16",
                                            "lora.r=4", "lora.target_modules=q_proj,v_proj", "optim.betas=[0.9,0.99]",
                                            "training.gradient_checkpointing=true", "data.train=[a.jsonl,b.jsonl]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.training.batch_size == 16 and cfg.training.precision == "bf16"
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.alpha == 16
    assert cfg.optim.betas == [0.9, 0.99] and cfg.training.gradient_checkpointing is True
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert load_config(raw={**MIN, "lora": {"r": 2}}, overrides=["lora=null"]).lora is None
    for value in ("all-linear", "[all-linear]"):
        cfg = load_config(raw=MIN, overrides=[f"lora.target_modules={value}"])
        assert cfg.lora.target_modules == "all-linear"


def test_unknown_keys_suggest_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'; did you mean 'optim.lr'"):
        load_config(_yaml(tmp_path, {**MIN, "optim": {"learning_rat": 1}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'training.batchsize'; did you mean 'training.batch_size'"):
        load_config(_yaml(tmp_path, MIN), ["training.batchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig'; did you mean 'training'"):
        load_config(raw={**MIN, "trainig": {}})
    with pytest.raises(ConfigError, match=r"'lora.rank'; did you mean 'lora.r'"):
        load_config(raw={**MIN, "lora": {"rank": 8}})


@pytest.mark.parametrize("override, match", [
    ("training.batch_size=0", r"training.batch_size must be positive, got 0"),
    ("training.batch_size=two", r"training.batch_size: expected an integer, got 'two'"),
    ("optim.schedule=exp", r"optim.schedule 'exp' is not one of"),
    ("training.precision=fp16", r"training.precision 'fp16' is not one of"),
    ("lora.dropout=1.5", r"lora.dropout must be in \[0, 1\), got 1.5"),
    ("model.init.family=bert", r"model: give exactly one of|family 'bert'"),
])
def test_bad_values_name_field_value_and_limit(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(raw=MIN, overrides=[override])


def test_errors_before_training(tmp_path):
    md = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4))
    # A LoRA target that matches no module
    raw = base_cfg(md, data, tmp_path / "r1")
    raw["lora"] = {"target_modules": ["qkv"]}
    with pytest.raises(ConfigError, match=r"matches no module; available Linear module names: \[.*'q_proj'"):
        train("sft", load_config(raw=raw, stage="sft"))
    # Resuming a run directory created from a different config
    raw = base_cfg(md, data, tmp_path / "r2", max_steps=1)
    train("sft", load_config(raw=raw, stage="sft"))
    raw["optim"]["lr"] = 5e-4
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: run has 0.001, now 0.0005"):
        train("sft", load_config(raw=raw, stage="sft"))
    # Unknown stage / unknown stage option
    with pytest.raises(ConfigError, match=r"unknown training stage 'sfft'; did you mean 'sft'"):
        train("sfft", load_config(raw=base_cfg(md, data, tmp_path / "r3"), stage="sft"))
    raw = base_cfg(md, data, tmp_path / "r4")
    raw["algo"] = {"beta": 0.1}
    with pytest.raises(ConfigError, match=r"unknown config key 'algo.beta'"):
        train("sft", load_config(raw=raw, stage="sft"))


def test_cli_train_and_plot(tmp_path, capsys):
    from lmstack.train.cli_train import add_parser, run

    md = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4))
    cfg = _yaml(tmp_path, base_cfg(md, data, tmp_path / "unused"))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli_run"
    args = parser.parse_args(["train", "sft", str(cfg), f"training.out_dir={out}", "training.max_steps=2",
                              "training.batch_size=2"])
    assert run(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["stage"] == "sft"
    assert (out / "final" / "model.safetensors").is_file()
    assert "sft: done at step 2" in capsys.readouterr().out
    (out / "loss.png").unlink()
    assert run(parser.parse_args(["plot", str(out)])) == 0
    assert (out / "loss.png").is_file()


@pytest.mark.parametrize("name", ["pretrain", "sft", "sft_lora", "sft_qlora"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    cfg = load_config(path, stage="pretrain" if name == "pretrain" else "sft")
    assert (cfg.lora is not None) == ("lora" in name) and (cfg.model.init is not None) == (name == "pretrain")
    if name == "sft_qlora":
        assert cfg.lora.qlora
    if cfg.lora is not None:
        assert cfg.lora.target_modules == "all-linear"
