"""Every verb that takes --model takes a .gguf file (eval, generate, chat, quantize, export, export hf,
train), `quantize --method int4` picks a group size that divides the model, and every entry point
computes in the one dtype lmstack.precision picks for "auto"."""
from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.checkpoint.gguf.load import load_gguf_model  # noqa: E402
from lmstack.cli import build_parser, main  # noqa: E402
from lmstack.precision import auto_dtype  # noqa: E402


@pytest.fixture(scope="module")
def q41(tmp_path_factory):
    """A Q4_1 GGUF of a tiny llama whose hidden size (192) 128 does not divide, like SmolLM's 576."""
    from tests.train_fixtures import make_model_dir

    tmp = tmp_path_factory.mktemp("g")
    d = make_model_dir(tmp)  # vocab 320, chatml tokenizer
    from tests.fixtures import make_tiny_hf

    make_tiny_hf("llama", d, vocab_size=320, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512)
    return export_gguf(d, tmp / "m-q4_1.gguf", "q4_1")


@pytest.fixture(autouse=True)
def _cli_log_handler():
    """main() adds a stderr handler bound to this test's captured stream; drop it afterwards."""
    yield
    from lmstack.log import logger

    for h in list(logger.handlers):
        logger.removeHandler(h)


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor([ids]), torch.arange(len(ids))[None]))[0].float()


IDS = [5, 17, 123, 42, 250, 7]


def test_export_hf_writes_the_source_precision(q41, tmp_path, capsys):
    """`lmstack export hf --model X.gguf` writes float16 for a Q4_1 file (half of fp32's bytes) that
    transformers loads with the GGUF model's logits."""
    import transformers

    assert main(["export", "hf", "--model", str(q41), "--out", str(tmp_path / "hf")]) == 0
    assert "float16: the GGUF file's precision" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    ref, _ = load_gguf_model(q41, torch.float32)
    n_params = sum(p.numel() for p in ref.parameters())
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    assert 2 * n_params <= size < 2 * n_params + 50_000  # 2 bytes a weight (+ header)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(got, _logits(ref, IDS), atol=2e-3, rtol=2e-3)  # fp16 rounding of the weights
    assert main(["export", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "must be a .gguf file" in capsys.readouterr().err


def test_eval_generate_chat_take_a_gguf(q41, tmp_path, capsys):
    from lmstack.chat_cli import run as chat_run

    data = tmp_path / "d.txt"
    data.write_text("Hello world! 12 + 30 = 42\n\nThe quick brown fox jumps over the lazy dog.")
    assert main(["eval", "--model", str(q41), "--task", "ppl", "--data", str(data), "--dtype", "float32"]) == 0
    ppl_gguf = float(re.search(r"perplexity: ([\d.]+)", capsys.readouterr().out).group(1))
    main(["export", "hf", "--model", str(q41), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "hf"), "--task", "ppl", "--data", str(data), "--dtype", "float32"]) == 0
    assert float(re.search(r"perplexity: ([\d.]+)", capsys.readouterr().out).group(1)) == pytest.approx(ppl_gguf, rel=1e-4)
    assert main(["eval", "--model", str(q41), "--task", "arith", "--n", "2"]) == 0
    assert main(["generate", "--model", str(q41), "--prompt", "Hello", "--max-tokens", "3"]) == 0
    args = build_parser(["chat"]).parse_args(["chat", "--model", str(q41), "--max-tokens", "3", "--temperature", "0"])
    out, err = io.StringIO(), io.StringIO()
    assert chat_run(args, stdin=io.StringIO("hi\n"), stdout=out, stderr=err) == 0
    assert out.getvalue().count("\n") == 1, err.getvalue()


def test_quantize_int4_picks_a_group_size_that_divides(q41, tmp_path, capsys):
    from lmstack.model.loading import load_model

    assert main(["quantize", "--model", str(q41), "--method", "int4", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "int4: group size 64 (128 does not divide in_features 192 of model.layers.0.self_attn.q_proj)" in out
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["group_size"] == 64 and cfg["torch_dtype"] == "float16"
    # the folder holds group-64 int4 of the file's weights (at their fp16 source precision)
    from lmstack.checkpoint.gguf.load import gguf_to_hf
    from lmstack.model.quant import quantize_model

    want = quantize_model(load_model(gguf_to_hf(q41, tmp_path / "hf"), dtype=torch.float32), "int4", 64)
    torch.testing.assert_close(_logits(load_model(tmp_path / "q", dtype=torch.float32), IDS), _logits(want, IDS))
    # an explicit group size that does not divide stays an error naming the layer
    assert main(["quantize", "--model", str(q41), "--method", "int4", "--group-size", "128",
                 "--out", str(tmp_path / "q2")]) == 2
    assert "group size 128 does not divide in_features 192" in capsys.readouterr().err


def test_train_and_merge_from_a_gguf_base(q41, tmp_path, capsys):
    """`lmstack train sft` with model.path a .gguf file (LoRA), then `lmstack export --model X.gguf
    --adapter ...` merges into it; `export gguf` takes the .gguf too."""
    import yaml

    from tests.train_fixtures import base_cfg, sft_rows, write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    cfg = base_cfg(q41, data, tmp_path / "run", max_steps=2)
    cfg["lora"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "sft", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "converting" in out and (tmp_path / "run" / "base_model" / "config.json").is_file()
    adapter = tmp_path / "run" / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("base_model")
    assert main(["export", "--model", str(q41), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert main(["export", "gguf", "--model", str(q41), "--out", str(tmp_path / "again.gguf"), "--type", "q4_1"]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == q41.read_bytes()


def test_one_dtype_rule_everywhere(q41, tmp_path, monkeypatch, caplog):
    """"auto" is bf16 where the CPU multiplies bf16 natively, else fp32, for LLM (what serve and chat
    run), generate / eval's loader and a .gguf, whatever the checkpoint stores; each logs its choice."""
    import lmstack.precision as precision
    from lmstack import LLM
    from lmstack.checkpoint.resolve import load_for_inference

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "native_bf16_cpu", lambda native=native: native)
        assert auto_dtype() == want
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lmstack"):
            assert LLM(str(q41)).model.dtype == want
            assert load_for_inference(q41)[0].dtype == want
            hf = tmp_path / f"hf{native}"
            main(["export", "hf", "--model", str(q41), "--out", str(hf)])  # an fp16 checkpoint
            assert load_for_inference(hf)[0].dtype == want
        name = str(want).removeprefix("torch.")
        assert sum(f"computing in {name}" in r.getMessage() for r in caplog.records) == 3


def test_serve_help_says_a_gguf_works(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert ".gguf file" in capsys.readouterr().out
