"""The quickstart pipeline end to end at its `tiny` profile (seconds): every stage runs and reports."""
from __future__ import annotations

import json
from dataclasses import replace

import transformers

from lmstack.quickstart import PROFILES, QuickstartConfig, run_quickstart


def test_tiny_quickstart_runs_every_stage(tmp_path):
    qc = replace(QuickstartConfig(**PROFILES["tiny"]), out_dir=str(tmp_path), align_stages=())
    events: list[str] = []
    report = run_quickstart(qc, events.append)
    names = [r["name"] for r in report["rows"]]
    assert names[:4] == ["tokenizer (BPE, split digits)", "pretrain", "sft_direct", "sft_cot"]
    for r in report["rows"][2:4]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["extra"]["n"] == qc.test_problems
    md = (tmp_path / "report.md").read_text()
    assert "| sft_cot |" in md and "Chain-of-thought SFT" in md
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == report["rows"]
    # every stage's output is an HF folder transformers loads, and each run wrote metrics
    for stage in ("pretrain", "sft_direct", "sft_cot"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / stage / "final")
        assert (tmp_path / stage / "metrics.jsonl").stat().st_size > 0
    transformers.AutoTokenizer.from_pretrained(tmp_path / "sft_cot" / "final")


def test_tiny_quickstart_alignment_rows_compare_with_sft(tmp_path):
    """The alignment section: preference data, then one row per method with its accuracy, the change
    vs SFT, and the paired fixed / broken counts on the same held-out problems."""
    qc = replace(QuickstartConfig(**PROFILES["tiny"]), out_dir=str(tmp_path), align_stages=("dpo", "grpo"))
    report = run_quickstart(qc, lambda s: None)
    rows = {r["name"]: r for r in report["rows"]}
    assert "align data (SFT samples)" in rows
    sft = rows["sft_cot"]["accuracy"]
    for stage in ("dpo", "grpo"):
        r = rows[stage]
        assert r["accuracy"] is not None and abs(r["delta"] - (r["accuracy"] - sft)) < 1e-12, r
        ex = r["extra"]
        # accuracy changes only through fixed and broken problems
        assert round((ex["fixed"] - ex["broken"]) / qc.test_problems, 9) == round(r["delta"], 9)
        assert 0.0 < ex["sign_test_p"] <= 1.0 and "sign test p=" in r["note"]
        assert "per_problem" not in ex  # kept out of report.json
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"align_{stage}" / "final")


def test_bad_quickstart_config_is_named():
    import pytest

    with pytest.raises(ValueError, match="align"):
        QuickstartConfig(align_stages=("dpo", "magic"))
    with pytest.raises(ValueError, match="ops"):
        QuickstartConfig(ops="/")
    with pytest.raises(ValueError, match=r"align_digits must be \(min, max\) with 1 <= min <= max, got \(3, 2\)"):
        QuickstartConfig(align_digits=(3, 2))
    with pytest.raises(ValueError, match="test_digits"):
        QuickstartConfig(test_digits=(0, 2))


def test_preference_pairs_target_the_greedy_answer():
    """DPO pairs reject the wrong greedy answer (the one the test scores) with up to two distinct right
    samples as chosen, or the reference solution when none is right; a right greedy answer gives no DPO
    pair. RM pairs keep every right-vs-wrong sample combination; KTO labels every distinct answer (and
    adds the reference solution where none is right)."""
    import random

    from lmstack.train.align_pipeline import Sampled, preference_data

    r, w, w2 = "2+3=5\nAnswer: 5", "2+3=6\nAnswer: 6", "2+3=7\nAnswer: 7"
    r2, r3 = "3+2=5\nAnswer: 5", "5\nAnswer: 5"
    sampled = [
        Sampled("p1", 5, "gold1\nAnswer: 5", greedy=w, samples=[r, r, r2, r3, w2]),
        Sampled("p2", 5, "gold2\nAnswer: 5", greedy=r, samples=[w, r2]),
        Sampled("p3", 5, "gold3\nAnswer: 5", greedy=w, samples=[w2, w2]),
        Sampled("p4", 5, "gold4\nAnswer: 5", greedy=r, samples=[r, r2]),
    ]
    rows = preference_data(sampled, rm_pairs_per_problem=4, rng=random.Random(0))
    got = sorted((p["prompt"], p["chosen"], p["rejected"]) for p in rows.pairs)
    assert got == [("p1", r, w), ("p1", r2, w), ("p3", "gold3\nAnswer: 5", w)]
    assert rows.n_gold == 1
    rm = sorted((p["prompt"], p["chosen"], p["rejected"]) for p in rows.rm_pairs)
    assert rm == sorted([("p1", c, w2) for c in (r, r2, r3)] + [("p2", r2, w), ("p3", "gold3\nAnswer: 5", w2)])
    kto = {(k["prompt"], k["completion"]): k["label"] for k in rows.kto}
    assert kto[("p1", w)] is False and kto[("p1", r3)] is True and kto[("p3", w2)] is False
    assert kto[("p3", "gold3\nAnswer: 5")] is True  # nothing right: the reference solution is desirable
    assert len(rows.kto) == 5 + 3 + 3 + 2  # distinct answers per problem, the greedy one included


def test_tiny_quickstart_runs_every_alignment_method(tmp_path):
    """`--stages all` at the tiny profile: every method gets a row and none fails, even when the model
    gets nothing right (KTO then has the reference solutions as its desirable examples)."""
    from lmstack.quickstart import ALL_ALIGN

    qc = replace(QuickstartConfig(**PROFILES["tiny"]), out_dir=str(tmp_path), align_stages=ALL_ALIGN)
    rows = {r["name"]: r for r in run_quickstart(qc, lambda s: None)["rows"]}
    for stage in ALL_ALIGN:
        assert stage in rows and not rows[stage]["note"].startswith(("failed", "no preference data")), rows[stage]
