"""lm-evaluation-harness scores a local multiple-choice task through `lmstack serve` (its
`local-completions` model with the server's remote tokenizer: /tokenizer_info, /tokenize) and gets the
same log-likelihood for every choice of every item as its own `hf` model on the same checkpoint.
Nothing comes from a hub: the task is a YAML over a local JSON-lines file."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmstack.engine.llm import LLM
from lmstack.engine.server import build_app
from tests.fixtures import make_tiny_hf
from tests.test_server import ServerThread
from tests.tok_fixtures import build_test_tokenizer

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: lmstack_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
WORDS = "red green blue cat dog sun moon tree river stone bread salt wind rain".split()


def _write_task(d: Path, n: int = 12) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        choices = [" " + " ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(4)]
        rows.append({"question": f"What goes with {a} and {b}?", "choices": choices, "answer": i % 4})
    data = d / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return d


def _per_choice(results: dict) -> list[tuple[int, list[float], float]]:
    """(doc id, [log-likelihood per choice], acc) per item, from lm-eval's logged samples."""
    out = []
    for s in sorted(results["samples"]["lmstack_tiny_mc"], key=lambda s: s["doc_id"]):
        out.append((s["doc_id"], [float(r[0]) for r in s["filtered_resps"]], float(s["acc"])))
    return out


def test_local_completions_equals_hf_item_for_item(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    make_tiny_hf("qwen2", model_dir, seed=0, vocab_size=320, initializer_range=0.3)
    build_test_tokenizer(model_dir, "chatml")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(_write_task(tmp_path)))
    common = dict(tasks=["lmstack_tiny_mc"], task_manager=tm, log_samples=True, num_fewshot=0,
                  bootstrap_iters=0)
    ref = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
                          batch_size=1, **common)
    engine = LLM(model_dir, dtype="float32", block_size=8, num_kv_blocks=512)
    srv = ServerThread(build_app(engine, "tiny"))
    try:
        got = simple_evaluate(model="local-completions", model_args=(
            f"model=tiny,base_url={srv.url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
            "num_concurrent=2,max_retries=1"), **common)
    finally:
        srv.stop()
    a, b = _per_choice(ref), _per_choice(got)
    assert len(a) == 12 and [x[0] for x in a] == [x[0] for x in b]
    for (doc, lls_ref, acc_ref), (_, lls, acc) in zip(a, b):
        assert lls == pytest.approx(lls_ref, abs=1e-3), doc
        assert acc == acc_ref, doc
    assert got["results"]["lmstack_tiny_mc"]["acc,none"] == ref["results"]["lmstack_tiny_mc"]["acc,none"]
