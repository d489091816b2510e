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
