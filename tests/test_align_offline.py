"""Offline alignment stages (rm, dpo, kto, orpo, simpo): data formats and bad data, chunked
completion log-probs against full logits, precomputed == live reference, one step moves the
chosen answer up relative to the rejected one, each stage trains end to end, and the reward
model scores the same in transformers."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from lmstack.model.loading import load_model
from lmstack.tokenizer import Tokenizer
from lmstack.train.algos import get_stage
from lmstack.train.algos._pref import collate_pairs, completion_logps, load_pairs
from lmstack.train.config import load_config
from lmstack.train.data import DataError
from lmstack.train.loop import train
from tests.train_fixtures import QA, make_model_dir, one_thread, write_jsonl  # noqa: F401 (autouse fixture)


def pair_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        wrong = QA[(i + 3) % len(QA)][1]
        rows.append({"prompt": q, "chosen": a, "rejected": wrong})
    return rows


def kto_rows(n: int = 12) -> list[dict]:
    rows = []
    for r in pair_rows(n // 2):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """PNG curves are the loop's business (tested there) and cost seconds per run here."""
    import lmstack.train.loop as loop

    monkeypatch.setattr(loop, "plot_run", lambda run_dir: [])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align")
    md = make_model_dir(tmp)
    pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows())
    kto = write_jsonl(tmp / "kto.jsonl", kto_rows())
    return tmp, md, pairs, kto, Tokenizer.from_dir(md)


def raw_cfg(md, data, out, algo=None, **training):
    return {"model": {"path": str(md)}, "data": {"train": [str(data)], "max_len": 256},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
            "training": {"max_steps": 3, "batch_size": 4, "seed": 0, "out_dir": str(out), "device": "cpu",
                         **training},
            "algo": algo or {}}


def make_stage(name, md, data, tok, out, algo=None):
    cfg = load_config(raw=raw_cfg(md, data, out, algo), stage=name)
    stage = get_stage(name)(cfg, tok)
    examples = stage.load_dataset([str(data)], "train")
    if hasattr(stage, "build_model"):
        model = stage.build_model(cfg, torch.device("cpu"))
    else:
        model = load_model(md, dtype=torch.float32)
    if hasattr(stage, "setup"):
        stage.setup(model, torch.device("cpu"))
    return stage, model, examples


# ----------------------------------------------------------------------------------------- data
def test_prompt_formats_give_identical_tokens(env):
    tmp, md, _, _, tok = env
    q, a, b = "What is 2 + 3?", "2 + 3 = 5.", "6"
    rows = [
        {"prompt": q, "chosen": a, "rejected": b},
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
         "rejected": [{"role": "assistant", "content": b}]},
        {"messages": [{"role": "user", "content": q}], "chosen": a, "rejected": b},
        {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": a},
         "rejected": {"from": "gpt", "value": b}},
        {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],  # implicit prompt
         "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": b}]},
    ]
    exs = load_pairs([str(write_jsonl(tmp / "fmt.jsonl", rows))], tok, 128)
    assert len(exs) == 5
    for e in exs[1:]:
        assert (e.prompt, e.chosen, e.rejected) == (exs[0].prompt, exs[0].chosen, exs[0].rejected)
    # the completion is the answer + end-of-turn token, exactly what SFT trains on
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert exs[0].chosen == tok.encode(a, add_special_tokens=False) + im_end
    assert tok.decode(exs[0].prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_bad_pairs_are_counted_skips_and_empty_data_is_an_error(env, caplog):
    tmp, md, _, _, tok = env
    rows = pair_rows(4) + [{"prompt": "Hi", "chosen": "same", "rejected": "same"},
                           {"prompt": "Hi", "chosen": "", "rejected": "x"}]
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        exs = load_pairs([str(write_jsonl(tmp / "bad.jsonl", rows))], tok, 128)
    assert len(exs) == 4
    assert "skipped 2 of 6 records (1 chosen == rejected, 1 empty completions" in caplog.text
    only_bad = write_jsonl(tmp / "allbad.jsonl", rows[4:])
    with pytest.raises(DataError, match="no usable examples"):
        load_pairs([str(only_bad)], tok, 128)
    with pytest.raises(DataError, match="missing column 'rejected'"):
        load_pairs([str(write_jsonl(tmp / "norej.jsonl", [{"prompt": "a", "chosen": "b"}]))], tok, 128)


def test_kto_with_one_label_is_an_error(env):
    tmp, md, _, _, tok = env
    rows = [r for r in kto_rows() if r["label"]]
    data = write_jsonl(tmp / "kto_one.jsonl", rows)
    cfg = load_config(raw=raw_cfg(md, data, tmp / "kto_one"), stage="kto")
    with pytest.raises(DataError, match="only desirable examples"):
        get_stage("kto")(cfg, tok).load_dataset([str(data)], "train")


# ------------------------------------------------------------------------------------ log-probs
def test_completion_logps_match_full_logits(env):
    tmp, md, pairs, _, tok = env
    exs = load_pairs([str(pairs)], tok, 256)[:4]
    model = load_model(md, dtype=torch.float32)
    batch = collate_pairs(exs, tok.pad_token_id)
    with torch.no_grad():
        sums, counts = completion_logps(model, batch, chunk=5)
        logits = model.compute_logits(model(batch["tokens"], batch["positions"])).log_softmax(-1)  # (R, T, V)
    for r in range(batch["tokens"].shape[0]):
        e = exs[r % 4]
        comp = e.chosen if r < 4 else e.rejected
        p = len(e.prompt)
        ref = sum(float(logits[r, p - 1 + i, t]) for i, t in enumerate(comp))
        assert counts[r] == len(comp)
        assert abs(float(sums[r]) - ref) < 1e-4


def test_precomputed_reference_gives_the_live_loss(env):
    tmp, md, pairs, _, tok = env
    live, m1, ex1 = make_stage("dpo", md, pairs, tok, tmp / "live", {"beta": 0.5})
    pre, m2, ex2 = make_stage("dpo", md, pairs, tok, tmp / "pre", {"beta": 0.5, "precompute_ref": True})
    assert pre.ref.model is None and all(e.ref_chosen is not None for e in ex2)
    with torch.no_grad():  # move the policies away from the reference identically
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            noise = torch.randn_like(p1) * 0.05
            p1.add_(noise)
            p2.add_(noise)
    b1, b2 = live.collate(ex1[:6]), pre.collate(ex2[:6])
    assert "ref_chosen" in b2 and "ref_chosen" not in b1
    l1, l2 = live.loss(m1, b1), pre.loss(m2, b2)
    assert abs(float(l1.total.detach()) - float(l2.total.detach())) < 1e-5
    assert abs(float(l1.metrics["rewards/margins"])) > 1e-2  # the policy really differs from the reference


@pytest.mark.parametrize("name,algo", [("dpo", {"beta": 0.5}), ("simpo", {}), ("orpo", {}), ("kto", {}),
                                       ("dpo", {"loss_type": "ipo"})])
def test_one_step_raises_chosen_relative_to_rejected(env, name, algo):
    tmp, md, pairs, kto, tok = env
    data = kto if name == "kto" else pairs
    stage, model, exs = make_stage(name, md, data, tok, tmp / f"step_{name}", algo)
    torch.manual_seed(0)
    pairs_ex = load_pairs([str(pairs)], tok, 256)[:6]
    probe = collate_pairs(pairs_ex, tok.pad_token_id)

    def gap() -> float:
        with torch.no_grad():
            lp, n = completion_logps(model, probe)
        return float((lp[:6] - lp[6:]).mean())

    before = gap()
    model.train()
    out = stage.loss(model, stage.collate(exs[:12] if name == "kto" else exs[:6]))
    (out.total / out.count).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    after = gap()
    assert after > before + 1e-3, (before, after)


# ------------------------------------------------------------------------------ stages end to end
@pytest.mark.parametrize("name", ["rm", "dpo", "kto", "orpo", "simpo"])
def test_each_stage_trains_and_changes_the_weights(env, name):
    tmp, md, pairs, kto, tok = env
    data = kto if name == "kto" else pairs
    out = tmp / f"run_{name}"
    raw = raw_cfg(md, data, out, {"precompute_ref": True} if name == "kto" else None, eval_every=2)
    raw["data"]["eval_fraction"] = 0.25
    if name == "dpo":  # through the CLI, as users run it
        import yaml

        from lmstack.cli import main

        cfg_file = tmp / "dpo.yaml"
        cfg_file.write_text(yaml.safe_dump(raw))
        assert main(["train", "dpo", str(cfg_file), "algo.beta=0.2"]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        res = train(name, load_config(raw=raw, stage=name))
        rows = res.metrics
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    before = load_model(md, dtype=torch.float32).state_dict()
    after = load_model(final, dtype=torch.float32).state_dict()
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if name != "kto":
        assert any("eval_accuracy" in r for r in rows)
    if name == "rm":
        assert "score.weight" in after and "lm_head.weight" not in after


def test_reward_model_scores_match_transformers(env):
    from transformers import AutoModelForSequenceClassification

    from lmstack.train.algos.rm import sequence_scores

    tmp, md, pairs, _, tok = env
    out = tmp / "rm_hf"
    train("rm", load_config(raw=raw_cfg(md, pairs, out), stage="rm"))
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] == tok.pad_token_id
    ours = load_model(final, dtype=torch.float32)
    hf = AutoModelForSequenceClassification.from_pretrained(final, torch_dtype=torch.float32).eval()
    batch = collate_pairs(load_pairs([str(pairs)], tok, 256)[:4], tok.pad_token_id)  # 8 rows, right padded
    assert (batch["lengths"] < batch["tokens"].shape[1]).any()  # some rows really are padded
    with torch.no_grad():
        s_ours = sequence_scores(ours, batch)
        mask = torch.arange(batch["tokens"].shape[1])[None] < batch["lengths"][:, None]
        s_hf = hf(input_ids=batch["tokens"], attention_mask=mask.long()).logits.squeeze(-1)
    assert s_ours.std() > 1e-4
    torch.testing.assert_close(s_ours, s_hf, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", [{}, {"qlora": True, "quantize_embeddings": True}], ids=["lora", "qlora-nf4-embeddings"])
def test_dpo_with_lora_uses_the_base_as_reference(env, quant):
    """Zero-initialised adapters: policy == reference at step 0, so the first loss is exactly log 2,
    and no reference copy is loaded (the base with adapters off is the reference). Also with QLoRA
    and NF4 embeddings, whose log-probs go through the vocabulary-chunked quantized head."""
    import math

    tmp, md, pairs, _, tok = env
    out = tmp / f"dpo_lora{len(quant)}"
    raw = raw_cfg(md, pairs, out, {"beta": 0.5}, max_steps=2, log_every=1)
    raw["lora"] = {"r": 4, "alpha": 8, **quant}
    cfg = load_config(raw=raw, stage="dpo")
    stage = get_stage("dpo")(cfg, tok)
    res = train(stage, cfg)
    assert stage.ref.model is None and stage.ref.policy is not None
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    assert abs(losses[0] - math.log(2)) < 1e-5 and losses[1] != losses[0]
    assert (out / "final" / "adapter_config.json").is_file()
