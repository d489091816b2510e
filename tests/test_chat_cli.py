"""`lmstack chat` driven through stdin, locally (a subprocess with a piped stdin) and against a server.

Reference: the offline engine's `LLM.chat` on the same multi-turn conversation (seeded sampling), so a
wrong history (turn lost, system message misplaced, reset ignored) changes the expected replies.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack import chat_cli
from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.server import build_app
from tests.test_server import NAME, ServerThread, make_chat_model, make_engine

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "hi there\n/system You are terse.\nand now?\n/reset\n\nbye\n/exit\nnever read\n"
PARAMS = SamplingParams(max_tokens=6, temperature=1.0, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return make_chat_model(tmp_path_factory.mktemp("chat_model"))


def expected_replies(ref: LLM) -> list[str]:
    """The replies the script must print, one per user line."""
    def say(messages: list[dict]) -> str:
        return ref.chat(messages, PARAMS)[0].outputs[0].text

    r1 = say([{"role": "user", "content": "hi there"}])
    # /system applies to the next turns and the history so far is kept
    conv2 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi there"},
             {"role": "assistant", "content": r1}, {"role": "user", "content": "and now?"}]
    r2 = say(conv2)
    # /reset forgets the turns but keeps the system message
    r3 = say([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "bye"}])
    assert len({r1, r2, r3}) == 3  # otherwise the comparison could not tell the turns apart
    return [r1, r2, r3]


def expected_stdout(ref: LLM) -> str:
    return "".join(r + "\n" for r in expected_replies(ref))  # each reply followed by a newline


def test_chat_local_through_piped_stdin(model_dir):
    ref = make_engine(model_dir)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "chat", "--model", str(model_dir), "--dtype", "float32",
         "--temperature", "1.0", "--seed", "5", "--max-tokens", "6", "--block-size", "8", "--num-kv-blocks", "256"],
        input=SCRIPT.encode(), capture_output=True, cwd=ROOT, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == expected_stdout(ref)
    assert "conversation cleared" in proc.stderr.decode()


def test_chat_against_server(model_dir):
    engine = make_engine(model_dir)
    srv = ServerThread(build_app(engine, NAME))
    try:
        args = argparse.Namespace(url=srv.url, model=None, api_key=None, system=None, max_tokens=6,
                                  temperature=1.0, top_p=1.0, top_k=0, seed=5)
        out, err = io.StringIO(), io.StringIO()
        rc = chat_cli.run(args, stdin=io.StringIO(SCRIPT), stdout=out, stderr=err)
        assert rc == 0, err.getvalue()
        assert out.getvalue() == expected_stdout(make_engine(model_dir))
        # a server-side error (here: over the context length) is reported and the chat goes on
        out, err = io.StringIO(), io.StringIO()
        chat_cli.run(args, stdin=io.StringIO("word " * 400 + "\nhi there\n"), stdout=out, stderr=err)
        assert "maximum context length" in err.getvalue()
        assert out.getvalue() == expected_replies(make_engine(model_dir))[0] + "\n"
    finally:
        srv.stop()
