"""The quickstart's alignment section: from the chain-of-thought SFT model to one report row per method.

1. Sample `pref_problems` training problems with the lmstack engine: the greedy answer (what the
   test measures) and `align_samples` answers at temperature 1; check each final number
   (`arith.extract_answer`).
2. Data (`preference_data`), written as JSONL next to the runs (`align_data/`) in the formats
   `lmstack train` reads:
   - preference pairs for DPO / ORPO / SimPO target the greedy answer: where it is wrong, it is the
     rejected answer and up to two correct samples are chosen (the reference CoT solution when no
     sample is right). Pairs of a right greedy answer against a wrong *sampled* one push down tokens
     greedy decoding never picks; measured on a dev set they cost accuracy (see quickstart.py);
   - reward-model pairs: every correct sample against a wrong one (up to `align_samples` per problem),
     so the RM learns to score the temperature-1 samples PPO will show it;
   - KTO examples: every distinct answer, labelled desirable iff correct (plus the reference
     solution, desirable, where no answer was right);
   - RL prompts: the first `align_problems` problems with their answers.
3. Train each requested stage from the SFT checkpoint through the same `load_config` + `train`
   route as `lmstack train <stage>` (rm before ppo, whose reward it is), evaluate on the held-out
   test set, and report accuracy, change versus SFT and wall time.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmstack.log import logger

ORDER = ("rm", "dpo", "kto", "orpo", "simpo", "ppo", "grpo")


@dataclass
class AlignData:
    pairs: str  # greedy-targeted pairs (DPO, ORPO, SimPO)
    kto: str
    prompts: str
    n_pairs: int
    n_kto: int
    sample_accuracy: float  # share of temperature-1 samples that were correct
    n_desirable: int = 0
    gold_chosen: int = 0  # problems whose chosen answer is the reference solution (no sample was right)
    rm_pairs: str = ""  # every right sample against a wrong one (reward model)
    n_rm_pairs: int = 0
    greedy_accuracy: float = 0.0


@dataclass
class Sampled:
    """One training problem and the SFT model's answers to it."""
    prompt: str
    answer: int
    gold: str  # the task's reference chain-of-thought solution
    greedy: str
    samples: list[str]


@dataclass
class PreferenceRows:
    pairs: list[dict]
    rm_pairs: list[dict]
    kto: list[dict]
    n_gold: int


def preference_data(sampled: list[Sampled], rm_pairs_per_problem: int, rng: random.Random,
                    chosen_per_problem: int = 2) -> PreferenceRows:
    """Turns sampled answers into DPO / RM pairs and KTO labels (see the module docstring)."""
    from lmstack.tasks import arith

    pairs: list[dict] = []
    rm_pairs: list[dict] = []
    kto: list[dict] = []
    n_gold = 0
    for s in sampled:
        right = lambda t: arith.extract_answer(t) == s.answer  # noqa: E731
        texts = list(dict.fromkeys(s.samples))  # distinct answers, in sample order
        ok = [t for t in texts if right(t)]
        bad = [t for t in texts if not right(t)]
        # an empty greedy answer (a model that stops at once) cannot be a DPO completion: the first
        # wrong non-empty sample stands in for it
        rejected = s.greedy if s.greedy.strip() else next((t for t in bad if t.strip()), None)
        if not right(s.greedy) and rejected is not None:
            chosen = ok[:chosen_per_problem]
            if not chosen:
                chosen = [s.gold]
                n_gold += 1
            pairs += [{"prompt": s.prompt, "chosen": c, "rejected": rejected} for c in chosen]
        combos = [(c, r) for c in (ok or ([s.gold] if bad else [])) for r in bad]
        rng.shuffle(combos)
        rm_pairs += [{"prompt": s.prompt, "chosen": c, "rejected": r} for c, r in combos[:rm_pairs_per_problem]]
        answers = texts + [s.greedy] + ([s.gold] if not ok and not right(s.greedy) else [])
        for t in dict.fromkeys(answers):  # the reference solution is the desirable one when nothing was right
            kto.append({"prompt": s.prompt, "completion": t, "label": right(t)})
    rng.shuffle(pairs)
    return PreferenceRows(pairs, rm_pairs, kto, n_gold)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def align_problems(qc: Any, n: int | None = None) -> list[Any]:
    """The training-split problems alignment samples on (their own RNG stream: not the SFT set's).
    The first `align_problems` of them are the RL prompts; preference data uses `pref_problems`."""
    from lmstack.tasks import arith

    rng = random.Random(f"lmstack-quickstart-align|{qc.seed}")
    return [arith.make_problem(rng, tuple(qc.ops), digits=tuple(qc.align_digits), split="train")
            for _ in range(qc.align_problems if n is None else n)]


def sample_tokens(qc: Any) -> int:
    return max(32, qc.max_len - 32)  # the CoT answers of the task are far shorter; wrong ones may ramble


def train_len(qc: Any) -> int:
    # prompt (chat template + question) + a sampled answer; the quickstart model has >= 256 positions
    return max(256, qc.max_len)


def build_preference_data(qc: Any, out: Path, sft_dir: str) -> AlignData:
    """Sample the SFT model on training problems and write pairs, KTO labels and RL prompts."""
    from lmstack.engine.llm import LLM
    from lmstack.engine.sampling_params import SamplingParams
    from lmstack.tasks import arith

    problems = align_problems(qc, max(qc.pref_problems, qc.align_problems))
    llm = LLM(sft_dir, dtype="float32", max_num_seqs=256, max_num_batched_tokens=8192, seed=qc.seed)
    chats = [[{"role": "user", "content": p.question}] for p in problems[: qc.pref_problems]]
    greedy = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=sample_tokens(qc)))
    samples = llm.chat(chats, SamplingParams(n=qc.align_samples, temperature=1.0, max_tokens=sample_tokens(qc),
                                             seed=qc.seed))
    del llm
    sampled = [Sampled(p.question, p.answer, arith.cot_solution(p), g.outputs[0].text, [o.text for o in s.outputs])
               for p, g, s in zip(problems, greedy, samples)]
    rows = preference_data(sampled, qc.align_samples, random.Random(qc.seed))
    n_samples = sum(len(s.samples) for s in sampled)
    sample_acc = sum(arith.extract_answer(t) == s.answer for s in sampled for t in s.samples) / max(n_samples, 1)
    greedy_acc = sum(arith.extract_answer(s.greedy) == s.answer for s in sampled) / max(len(sampled), 1)
    d = out / "align_data"
    rl = [{"prompt": p.question, "answer": p.answer} for p in problems[: qc.align_problems]]
    return AlignData(_write_jsonl(d / "pairs.jsonl", rows.pairs), _write_jsonl(d / "kto.jsonl", rows.kto),
                     _write_jsonl(d / "rl_prompts.jsonl", rl), len(rows.pairs), len(rows.kto), sample_acc,
                     sum(r["label"] for r in rows.kto), rows.n_gold,
                     _write_jsonl(d / "rm_pairs.jsonl", rows.rm_pairs), len(rows.rm_pairs), greedy_acc)


# Hyper-parameters of the alignment runs; a QuickstartConfig field of the same name overrides each.
# Measured on a reduced quickstart (+ only, 2-digit test, CoT SFT at 10% held-out): DPO with the NLL
# term at lr 1e-4, beta 0.1, 60 steps -> 13%; plain DPO (nll 0) -> 3%; lr 3e-4 / 5e-5 -> 11%;
# beta 0.3 -> 10%; 120 steps -> 11% (100 test problems: +-3 points is noise).
DEFAULTS = {"align_lr": 1e-4, "dpo_lr": 1e-4, "dpo_beta": 0.1, "dpo_nll_weight": 1.0, "rl_lr": 3e-5}


def _hp(qc: Any, name: str) -> Any:
    return getattr(qc, name, DEFAULTS[name])


# Per-stage recipes for the quickstart model (~1M parameters, full fine-tuning). lr / beta were
# tuned in optimizer steps on the default quickstart (see the report).
def stage_config(qc: Any, stage: str, out: Path, sft_dir: str, data: AlignData, rm_dir: str | None) -> dict[str, Any]:
    steps = qc.rl_steps if stage in ("ppo", "grpo") else qc.align_steps
    training = {"max_steps": steps, "batch_size": qc.batch_size, "out_dir": str(out / f"align_{stage}"),
                "seed": qc.seed, "log_every": max(1, steps // 30), "precision": qc.precision, "resume": False,
                "save_every": 0, "keep_checkpoints": 1}
    optim = {"lr": _hp(qc, 'align_lr'), "warmup_steps": max(1, steps // 10), "schedule": "cosine", "min_lr_ratio": 0.1}
    raw: dict[str, Any] = {"model": {"path": sft_dir}, "optim": optim, "training": training}
    max_len = train_len(qc)
    if stage == "rm":
        raw["data"] = {"train": [data.rm_pairs], "max_len": max_len}
    elif stage in ("dpo", "orpo", "simpo"):
        raw["data"] = {"train": [data.pairs], "max_len": max_len}
    elif stage == "kto":
        raw["data"] = {"train": [data.kto], "max_len": max_len}
    else:
        raw["data"] = {"train": [data.prompts], "max_len": max_len}
    if stage == "rm":
        raw["data"]["eval_fraction"] = 0.1
        optim["lr"] = _hp(qc, 'align_lr') * 3  # a fresh head learns faster than a pretrained policy should move
    elif stage == "dpo":
        # + NLL on the chosen answer (RPO, Pang et al. 2024, "Iterative Reasoning Preference
        # Optimization"): on self-sampled right-vs-wrong chains of thought plain DPO tends to lower
        # the likelihood of both answers; the NLL term keeps the chosen one up.
        optim["lr"] = _hp(qc, "dpo_lr")
        raw["algo"] = {"beta": _hp(qc, 'dpo_beta'), "precompute_ref": True, "nll_weight": _hp(qc, 'dpo_nll_weight')}
    elif stage == "kto":
        # λ_D n_D = λ_U n_U: the paper's recommended balance when one label is rarer
        n_d, n_u = max(data.n_desirable, 1), max(data.n_kto - data.n_desirable, 1)
        raw["algo"] = {"beta": _hp(qc, 'dpo_beta'), "precompute_ref": True,
                       "desirable_weight": max(1.0, n_u / n_d), "undesirable_weight": max(1.0, n_d / n_u)}
    elif stage == "orpo":
        raw["algo"] = {"lam": 0.1}
    elif stage == "simpo":
        raw["algo"] = {"beta": 2.0, "gamma_beta_ratio": 0.5}
    elif stage in ("ppo", "grpo"):
        training["batch_size"] = 8
        optim["lr"] = _hp(qc, 'rl_lr')
        raw["algo"] = {"max_tokens": min(128, sample_tokens(qc))}
        if stage == "grpo":
            raw["algo"]["num_generations"] = 8
        else:
            raw["algo"].update(reward_model=rm_dir, num_generations=1)
    return raw


def _train(stage: str, raw: dict[str, Any]) -> Any:
    from lmstack.train.config import load_config
    from lmstack.train.loop import train

    return train(stage, load_config(raw=raw, stage=stage))


def _available(stage: str) -> bool:
    from lmstack.train.algos import available_stages

    return stage in available_stages()


def run_alignment(qc: Any, out: Path, sft_dir: str, tok_dir: str, sft_accuracy: float | None,
                  on_event: Callable[[str], None] = lambda s: None,
                  sft_per_problem: list[bool] | None = None) -> list[Any]:
    """Runs `qc.align_stages` from the CoT SFT model; returns one quickstart Row per method.

    With the SFT model's per-problem results, each method's note also says how many held-out problems
    it fixed and broke, and the exact sign-test p-value of that split (is the change real or noise?)."""
    from lmstack.evaluate import paired_sign_test
    from lmstack.quickstart import Row, evaluate_model

    rows: list[Row] = []
    stages = [s for s in ORDER if s in qc.align_stages]
    if "ppo" in stages and "rm" not in stages:
        stages.insert(0, "rm")  # PPO's reward is the trained reward model
    need_pairs = any(s in stages for s in ("rm", "dpo", "kto", "orpo", "simpo"))
    out = Path(out)
    t0 = time.perf_counter()
    if need_pairs:
        on_event(f"align: greedy + {qc.align_samples} sampled answers to {qc.pref_problems} training problems "
                 "(preference and KTO data)")
        data = build_preference_data(qc, out, sft_dir)
        note = (f"greedy {100 * data.greedy_accuracy:.0f}% correct, samples {100 * data.sample_accuracy:.0f}%; "
                f"{data.n_pairs} pairs against wrong greedy answers ({data.gold_chosen} with the reference "
                f"solution as chosen), {data.n_rm_pairs} RM pairs, {data.n_kto} KTO examples")
        rows.append(Row("align data (SFT samples)", wall_s=time.perf_counter() - t0, note=note))
        logger.info("align data: %s", note)
    else:
        rl = [{"prompt": p.question, "answer": p.answer} for p in align_problems(qc)]
        p = _write_jsonl(out / "align_data" / "rl_prompts.jsonl", rl)
        data = AlignData("", "", p, 0, 0, 0.0)
    rm_dir: str | None = None
    for stage in stages:
        if not _available(stage):
            logger.warning("align: stage %r is not available in this build; skipped", stage)
            rows.append(Row(stage, note="not available (skipped)"))
            continue
        n_data = {"rm": data.n_rm_pairs, "kto": data.n_kto}.get(stage, data.n_pairs)
        if stage in ("rm", "dpo", "kto", "orpo", "simpo") and n_data == 0:
            rows.append(Row(stage, note="no preference data (no wrong greedy answer, or no right-vs-wrong samples): skipped"))
            continue
        if stage == "ppo" and rm_dir is None:
            rows.append(Row(stage, note="needs the reward model, which was not trained: skipped"))
            continue
        on_event(f"align: {stage}")
        t1 = time.perf_counter()
        try:
            res = _train(stage, stage_config(qc, stage, out, sft_dir, data, rm_dir))
        except Exception as e:  # one failing method must not lose the others' results
            logger.exception("align: %s failed", stage)
            rows.append(Row(stage, wall_s=time.perf_counter() - t1, note=f"failed: {type(e).__name__}: {e}"))
            continue
        last = next((r for r in reversed(res.metrics) if "loss" in r), {})
        if stage == "rm":
            rm_dir = str(res.final_dir)
            ev = next((r for r in reversed(res.metrics) if "eval_accuracy" in r), {})
            acc = ev.get("eval_accuracy")
            rows.append(Row("rm", None, None, time.perf_counter() - t1,
                            f"held-out pair accuracy {acc:.2f}" if acc is not None else "reward model"))
            continue
        on_event(f"eval: {stage} on {qc.test_problems} held-out problems")
        ev = evaluate_model(qc, str(res.final_dir))
        delta = None if sft_accuracy is None else ev["accuracy"] - sft_accuracy
        extras = [f"format ok {ev['format_ok']:.2f}"]
        mine = ev.pop("per_problem")
        if sft_per_problem is not None:
            fixed, broken, p = paired_sign_test(sft_per_problem, mine)
            ev.update(fixed=fixed, broken=broken, sign_test_p=p)
            extras.insert(0, f"fixed {fixed} / broke {broken} of SFT's answers (sign test p={p:.2g})")
        for k in ("rewards/accuracies", "rewards/margins", "kl", "reward", "accuracy"):
            if k in last:
                extras.append(f"final {k} {last[k]:.2f}")
        rows.append(Row(stage, ev["accuracy"], delta, time.perf_counter() - t1, ", ".join(extras), ev))
    return rows
