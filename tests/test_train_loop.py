"""The training loop: accumulation invariance, data parallel == accumulation, exact resume
(including Ctrl-C mid-step), pretraining from scratch into a folder transformers loads, plots."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from lmstack.model.loading import load_model
from lmstack.tokenizer import Tokenizer
from lmstack.train.algos.sft import SFT
from lmstack.train.config import load_config
from lmstack.train.distributed import DistInfo
from lmstack.train.loop import forward_backward, train
from lmstack.train.metrics import plot_run, read_metrics
from lmstack.train.optim import lr_factor
from tests.tok_fixtures import build_test_tokenizer
from tests.train_fixtures import base_cfg, make_model_dir, sft_rows, write_jsonl, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    md = make_model_dir(tmp)
    data = write_jsonl(tmp / "sft.jsonl", sft_rows(16))
    return tmp, md, data


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def test_accumulation_invariance_grads(setup):
    tmp, md, data = setup
    cfg = load_config(raw=base_cfg(md, data, tmp / "unused"), stage="sft")
    stage = SFT(cfg, Tokenizer.from_dir(md))
    exs = stage.load_dataset([str(data)], "train")[:8]
    assert len({len(e.ids) for e in exs}) > 1  # different lengths: padding differs between the splits
    model = load_model(md).train()
    params = [p for p in model.parameters()]

    def run(micro):
        model.zero_grad(set_to_none=True)
        loss, count, _ = forward_backward(stage, model, micro, contextlib.nullcontext(), params, DistInfo())
        return loss, count, [p.grad.clone() for p in params]

    l8, c8, g8 = run([stage.collate(exs)])
    l1, c1, g1 = run([stage.collate([e]) for e in exs])
    # Reference: the mean token NLL over all 8 examples, computed with full logits.
    with torch.no_grad():
        nll, n = 0.0, 0
        for e in exs:
            b = stage.collate([e])
            logits = model.compute_logits(model(b["tokens"], b["positions"]))
            nll += torch.nn.functional.cross_entropy(logits[0], b["labels"][0], reduction="sum").item()
            n += int((b["labels"] != -100).sum())
    assert c8 == c1 == n
    assert l8 == pytest.approx(nll / n, rel=1e-5) and l1 == pytest.approx(nll / n, rel=1e-5)
    for a, b in zip(g8, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # Gradient checkpointing recomputes activations in backward: same gradients.
    model.gradient_checkpointing = True
    lc, _, gc = run([stage.collate(exs)])
    assert lc == pytest.approx(l8, rel=1e-6)
    for a, b in zip(g8, gc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_batch8_accum1_equals_batch1_accum8(setup):
    tmp, md, data = setup
    runs = {}
    for bs, acc in ((8, 1), (1, 8)):
        out = tmp / f"inv_{bs}x{acc}"
        cfg = load_config(raw=base_cfg(md, data, out, max_steps=3, batch_size=bs, grad_accum=acc), stage="sft")
        res = train("sft", cfg)
        runs[(bs, acc)] = (_losses(res.metrics), load_model(res.final_dir))
    (la, ma), (lb, mb) = runs.values()
    assert la == pytest.approx(lb, rel=1e-5)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, raw: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train("sft", load_config(raw=raw, stage="sft"))


def test_two_gloo_processes_equal_one_process_with_double_accumulation(setup):
    import torch.multiprocessing as mp

    tmp, md, data = setup
    raw = base_cfg(md, data, tmp / "ddp", max_steps=3, batch_size=2, grad_accum=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), raw), nprocs=2, join=True)
    single = train("sft", load_config(raw=base_cfg(md, data, tmp / "single", max_steps=3, batch_size=2,
                                                   grad_accum=4), stage="sft"))
    assert _losses(read_metrics(tmp / "ddp")) == pytest.approx(_losses(single.metrics), rel=1e-5)
    a, b = load_model(tmp / "ddp" / "final"), load_model(single.final_dir)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


class _InterruptingSFT(SFT):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the n-th call of `loss`."""

    def __init__(self, cfg, tok, at_call: int):
        super().__init__(cfg, tok)
        self.calls, self.at_call = 0, at_call

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_resume_gives_the_same_losses(setup):
    tmp, md, data = setup

    def raw(out):
        r = base_cfg(md, data, out, max_steps=20, batch_size=2, grad_accum=2)
        r["lora"] = {"r": 4, "alpha": 8, "dropout": 0.2}  # dropout: the RNG state must be restored too
        return r

    straight = _losses(train("sft", load_config(raw=raw(tmp / "straight"), stage="sft")).metrics)
    assert len(straight) == 20

    part = train("sft", load_config(raw=raw(tmp / "resumed"), stage="sft"), stop_at_step=10)
    assert part.interrupted and part.step == 10 and part.final_dir is None
    done = train("sft", load_config(raw=raw(tmp / "resumed"), stage="sft"))
    assert done.step == 20
    assert _losses(read_metrics(tmp / "resumed")) == pytest.approx(straight, rel=1e-6)

    # Ctrl-C in the middle of step 7's accumulation window (call 14 = 2nd micro-batch of step 7).
    cfg = load_config(raw=raw(tmp / "ctrlc"), stage="sft")
    res = train(_InterruptingSFT(cfg, Tokenizer.from_dir(md), at_call=14), cfg)
    assert res.interrupted and res.step == 6
    assert (tmp / "ctrlc" / "checkpoints" / "step_0000006" / "trainer_state.json").is_file()
    train("sft", load_config(raw=raw(tmp / "ctrlc"), stage="sft"))
    assert _losses(read_metrics(tmp / "ctrlc")) == pytest.approx(straight, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_pretraining_from_scratch_writes_a_folder_transformers_loads(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = build_test_tokenizer(tmp_path / "tok", "llama3")
    docs = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
            "12 * 34 = 408 and 365 + 1 = 366.", "你好世界！今天天气很好。"] * 4
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    raw = {"model": {"tokenizer": tok_dir, "init": {"family": family, "hidden_size": 32, "num_layers": 2,
                                                    "num_heads": 4, "max_position_embeddings": 64}},
           "data": {"train": [str(data)], "max_len": 32},
           "optim": {"lr": 3e-3, "warmup_steps": 1},
           "training": {"max_steps": 6, "batch_size": 4, "out_dir": str(tmp_path / "run"), "device": "cpu",
                        "eval_every": 3},
           }
    raw["data"]["eval_fraction"] = 0.2
    res = train("pretrain", load_config(raw=raw, stage="pretrain"))
    losses = _losses(res.metrics)
    assert losses[-1] < losses[0]
    assert any("eval_loss" in r for r in res.metrics)
    hf = AutoModelForCausalLM.from_pretrained(res.final_dir, torch_dtype=torch.float32).eval()
    ours = load_model(res.final_dir)
    ids = AutoTokenizer.from_pretrained(res.final_dir)("Hello world!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = hf(input_ids=ids).logits
        b = ours.compute_logits(ours(ids, torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (res.run_dir / "config.yaml").is_file() and (res.run_dir / "loss.png").is_file()


def test_lr_schedule_shapes():
    # warmup: linear to the peak; cosine: half a cosine from 1 to min_ratio; linear: straight line.
    assert [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(12, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(19, 0, 20, "constant", 0.0) == 1.0


def test_plot_run_writes_pngs(tmp_path):
    rows = [{"step": i, "loss": 3.0 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.0} for i in range(1, 6)]
    rows.append({"step": 5, "eval_loss": 2.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "metrics.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


class _ToyOnline(SFT):
    """The alignment-stage contract in miniature: an extra trainable module (a value head) from
    `setup`, micro-batches produced by `rollout`, stage metrics from `loss` and `evaluate`."""

    name = "toy_online"

    def setup(self, model, device):
        torch.manual_seed(1)
        self.head = torch.nn.Linear(model.config.hidden_size, 1)
        self.rollouts = 0
        return [self.head]

    def rollout(self, model, examples):
        self.rollouts += 1
        half = len(examples) // 2
        return [self.collate(examples[:half]), self.collate(examples[half:])]

    def loss(self, model, batch):
        from lmstack.train.algos import LossOutput
        from lmstack.train.fused_ce import fused_linear_nll

        hidden = model(batch["tokens"], batch["positions"])
        n = (batch["labels"] != -100).sum()
        value = self.head(hidden).squeeze(-1).pow(2).mean()
        total = fused_linear_nll(hidden, model.lm_head.weight, batch["labels"]) + value * n
        return LossOutput(total, n, {"value": value})

    def evaluate(self, model):
        return {"rollouts": float(self.rollouts)}


def test_online_stage_with_extra_module(setup):
    from safetensors.torch import load_file

    tmp, md, data = setup
    cfg = load_config(raw=base_cfg(md, data, tmp / "online", max_steps=4, batch_size=2, eval_every=2), stage="sft")
    stage = _ToyOnline(cfg, Tokenizer.from_dir(md))
    res = train(stage, cfg)
    assert stage.rollouts == 2  # 2 prompts -> 2 micro-batches -> one rollout per 2 steps
    assert all("value" in r for r in res.metrics if "loss" in r)
    assert [r["eval_rollouts"] for r in res.metrics if "eval_rollouts" in r] == [1.0, 2.0]
    ckpt = load_file(str(next((tmp / "online" / "checkpoints").iterdir()) / "trainable.safetensors"))
    torch.manual_seed(1)
    init = torch.nn.Linear(stage.head.in_features, 1).weight
    assert torch.equal(ckpt["extra.0.weight"], stage.head.weight.detach()) and not torch.equal(ckpt["extra.0.weight"], init)
