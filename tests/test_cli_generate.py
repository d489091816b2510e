"""`lmstack generate` end to end: same continuation as transformers, clear errors without traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, timeout=120)


def _model_with_tokenizer(tmp_path, family="qwen2", style="chatml"):
    tok_dir = build_test_tokenizer(tmp_path / "tok", style=style)
    hf = make_tiny_hf(family, tmp_path / "m", vocab_size=320)
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, tmp_path / "m" / f.name)
    return hf, tmp_path / "m", tok_dir


def test_generate_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    hf, mdir, _ = _model_with_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(mdir)
    ids = tok("你好", return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    expected = tok.decode(ref, skip_special_tokens=True)
    r = _cli("generate", "--model", str(mdir), "--prompt", "你好", "--temperature", "0", "--max-tokens", "20",
             "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert expected.strip() and r.stdout == expected + "\n"


def test_generate_chat_flag_uses_template(tmp_path):
    _, mdir, _ = _model_with_tokenizer(tmp_path)
    r = _cli("generate", "--model", str(mdir), "--prompt", "hi", "--chat", "--max-tokens", "5", "--dtype", "float32")
    assert r.returncode == 0, r.stderr


def test_generate_errors_are_one_line(tmp_path):
    r = _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    r = _cli("generate", "--model", str(tmp_path / "bad"), "--prompt", "x")
    assert r.returncode == 2 and "FooForCausalLM" in r.stderr and "Traceback" not in r.stderr
    _, mdir, _ = _model_with_tokenizer(tmp_path)
    r = _cli("generate", "--model", str(mdir), "--prompt", "a " * 300, "--max-tokens", "10")
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr


def test_every_design_verb_is_wired():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for verb in ("generate", "chat", "serve", "train", "tokenizer", "export", "quantize", "eval", "bench",
                 "quickstart", "plot"):
        assert f"    {verb} " in r.stdout, verb
