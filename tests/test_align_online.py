"""Online RL stages (GRPO, PPO): rollouts through the lmstack engine on the live weights, advantages,
rewards that fail, reference policies, and tiny end-to-end runs whose parameters must move."""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pytest
import torch

import lmstack.train.loop as loop_mod
from lmstack.config import ConfigError
from lmstack.model.loading import load_model, save_model
from lmstack.tasks import arith
from lmstack.tokenizer import Tokenizer
from lmstack.train.algos._rollout import RewardFailure, pack
from lmstack.train.algos.grpo import GRPO
from lmstack.train.algos.ppo import PPO, ValueHead
from lmstack.train.config import load_config
from lmstack.train.loop import train
from lmstack.train.metrics import read_metrics
from tests.train_fixtures import make_model_dir, one_thread, write_jsonl  # noqa: F401  (one_thread: autouse)

HERE = "tests.test_align_online"


# ----------------------------------------------------------------------------- reward functions
def len_reward(completion: str, answer) -> float:
    """Varies across random completions, so groups have a non-zero std."""
    return float(len(completion) % 7)


_CALLS = {"n": 0}


def flaky_reward(completion: str, answer) -> float:
    """Raises on every 3rd call and returns NaN on every 5th."""
    _CALLS["n"] += 1
    if _CALLS["n"] % 3 == 0:
        raise RuntimeError("flaky reward service")
    if _CALLS["n"] % 5 == 0:
        return float("nan")
    return float(len(completion) % 7)


def broken_reward(completion: str, answer) -> float:
    raise KeyError("no such field")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    # PNG curves are tested with the loop; drawing a dozen RL metrics costs seconds per run.
    monkeypatch.setattr(loop_mod, "plot_run", lambda run_dir: [])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    md = make_model_dir(tmp)
    data = write_jsonl(tmp / "rl.jsonl", arith.rl_prompts(12, seed=0))
    return {"tmp": tmp, "model": md, "data": data}


def raw_cfg(env, out: Path, algo: dict, **training) -> dict:
    return {"model": {"path": str(env["model"])}, "data": {"train": [str(env["data"])]},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "seed": 0, "out_dir": str(out),
                         "device": "cpu", **training},
            "algo": {"max_tokens": 8, "max_prompt_len": 200, **algo}}


def make_stage(cls, env, out: Path, algo: dict, **training):
    cfg = load_config(raw=raw_cfg(env, out, algo, **training), stage=cls.name)
    tok = Tokenizer.from_dir(str(env["model"]))
    stage = cls(cfg, tok)
    model = load_model(str(env["model"]))
    extra = stage.setup(model, torch.device("cpu"))
    model.train()
    return stage, model, extra


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


# ----------------------------------------------------------------------------- GRPO
def test_grpo_cli_runs_through_engine_and_updates_params(env, tmp_path, monkeypatch):
    """`lmstack train grpo configs/grpo.yaml ...`: rollouts go through the engine, parameters move."""
    from lmstack.train import cli_train
    from lmstack.train.algos import _rollout

    calls = []
    orig = _rollout.EngineRollout.generate

    def spy(self, model, prompts, n, *a, **k):
        calls.append((len(prompts), n, self.llm.get_stats().num_generated_tokens))
        return orig(self, model, prompts, n, *a, **k)

    monkeypatch.setattr(_rollout.EngineRollout, "generate", spy)
    out = tmp_path / "run"
    over = [f"model.path={env['model']}", f"data.train=[{env['data']}]", "data.eval_fraction=0.25",
            f"training.out_dir={out}", "training.max_steps=2", "training.batch_size=2", "training.eval_every=0",
            "training.device=cpu", "training.precision=fp32", "optim.lr=1e-3", "algo.num_generations=4",
            "algo.max_tokens=8", "algo.max_prompt_len=200", f"algo.reward_fn={HERE}:len_reward"]
    args = argparse.Namespace(train_cmd="train", stage="grpo", config="configs/grpo.yaml", overrides=over)
    assert cli_train.run(args) == 0
    # 2 training rollouts of 2 prompts x G=4, then the greedy eval of the 3 held-out prompts (n=1)
    assert [(c[0], c[1]) for c in calls] == [(2, 4), (2, 4), (3, 1)]
    assert calls[0][2] == 0 and calls[1][2] >= 2 * 4  # the engine produced the first rollout's tokens
    before = load_model(str(env["model"]))
    after = load_model(str(out / "final"))
    assert changed(params(before), params(after))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2 and all(math.isfinite(r["loss"]) for r in train_rows)
    for k in ("reward", "reward_std", "accuracy", "completion_len", "clipfrac", "approx_kl"):
        assert k in train_rows[0], k
    assert train_rows[0]["completion_len"] <= 8
    ev = [r for r in rows if "eval_accuracy" in r]
    assert ev and 0.0 <= ev[-1]["eval_accuracy"] <= 1.0


def test_grpo_raises_a_learnable_reward(env, tmp_path):
    """The metric moves the right way: a few GRPO steps raise the share of digits the policy writes."""
    cfg = load_config(raw=raw_cfg(env, tmp_path / "run", {"num_generations": 8, "reward_fn": f"{HERE}:digit_reward"},
                                  max_steps=6, batch_size=4), stage="grpo")
    cfg.optim.lr = 1e-2
    rewards = [r["reward"] for r in train("grpo", cfg).metrics if "reward" in r]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) > 2 * sum(rewards[:2]) > 0, rewards


def test_grpo_rollout_advantages_and_old_logps(env, tmp_path):
    G = 4
    stage, model, _ = make_stage(GRPO, env, tmp_path, {"num_generations": G, "reward_fn": f"{HERE}:len_reward"})
    examples = stage.load_dataset([str(env["data"])], "train")[:3]
    (mb,) = stage.rollout(model, examples)  # 1 epoch x 1 minibatch x grad_accum 1
    assert mb["tokens"].shape[0] == 3 * G
    # group-normalized advantages: zero mean per group, (r - mean) / (std + 1e-4) with the unbiased std
    for g in range(3):
        sel = mb["group"] == g
        r, a = mb["rewards"][sel], mb["advantages"][sel]
        assert abs(float(a.mean())) < 1e-5
        torch.testing.assert_close(a, (r - r.mean()) / (r.std() + 1e-4))
    # old log-probs equal an independent full-logits computation at the completion positions
    with torch.no_grad():
        model.eval()
        h = model(mb["tokens"], mb["positions"])
        lp = torch.log_softmax(model.compute_logits(h).float(), -1)[:, :-1]
        ref = lp.gather(-1, mb["tokens"][:, 1:, None]).squeeze(-1)
    mask = mb["action_mask"]
    torch.testing.assert_close(mb["old_logps"][mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert float(mb["old_logps"][~mask].abs().sum()) == 0.0
    # first step on fresh rollout: ratio 1, loss is -mean(advantage) over tokens
    model.train()
    out = stage.loss(model, mb)
    torch.testing.assert_close(out.total / out.count,
                               -(mb["advantages"][:, None] * mask).sum() / mask.sum(), atol=1e-5, rtol=1e-4)
    assert float(out.count) == float(mask.sum())


def test_grpo_sequence_normalization_counts_completions(env, tmp_path):
    stage, model, _ = make_stage(GRPO, env, tmp_path, {"num_generations": 2, "normalization": "sequence",
                                                       "reward_fn": f"{HERE}:len_reward"})
    examples = stage.load_dataset([str(env["data"])], "train")[:2]
    (mb,) = stage.rollout(model, examples)
    out = stage.loss(model, mb)
    assert float(out.count) == 4.0
    # sequence-level: each completion weighs the same whatever its length: sum_i -A_i (ratio 1)
    torch.testing.assert_close(out.total, -mb["advantages"].sum(), atol=1e-5, rtol=1e-4)


def test_grpo_group_size_below_2_is_a_config_error(env, tmp_path):
    cfg = load_config(raw=raw_cfg(env, tmp_path, {"num_generations": 1}), stage="grpo")
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        train("grpo", cfg)


def test_reward_that_raises_or_returns_nan_is_skipped(env, tmp_path, caplog):
    _CALLS["n"] = 0
    cfg = load_config(raw=raw_cfg(env, tmp_path / "run", {"num_generations": 4, "reward_fn": f"{HERE}:flaky_reward"}),
                      stage="grpo")
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        res = train("grpo", cfg)
    assert any("reward function failed on" in r.getMessage() for r in caplog.records)
    rows = [r for r in res.metrics if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["reward_skipped"] for r in rows) > 0


def test_reward_failing_everywhere_is_a_clear_error(env, tmp_path):
    cfg = load_config(raw=raw_cfg(env, tmp_path, {"num_generations": 2, "reward_fn": f"{HERE}:broken_reward"}),
                      stage="grpo")
    with pytest.raises(RewardFailure, match="KeyError"):
        train("grpo", cfg)


def test_bad_reward_fn_path_is_a_config_error(env, tmp_path):
    cfg = load_config(raw=raw_cfg(env, tmp_path, {"reward_fn": "lmstack.tasks.arith:no_such_fn"}), stage="grpo")
    with pytest.raises(ConfigError, match="no function 'no_such_fn'"):
        train("grpo", cfg)


def test_engine_runs_on_live_weights_after_an_update(env, tmp_path):
    """The engine shares the policy's tensors: a weight change shows up in the next rollout, with no
    rebuild, and matches the dense reference generate of the changed model (no stale KV cache)."""
    from lmstack.generate import generate

    stage, model, _ = make_stage(GRPO, env, tmp_path, {"num_generations": 2})
    prompts = [e.prompt_ids for e in stage.load_dataset([str(env["data"])], "train")[:4]]
    llm = stage.backend.llm

    def greedy() -> list[list[int]]:
        return [g[0].token_ids for g in stage.backend.generate(model, prompts, 1, 8, temperature=0.0)]

    before = greedy()
    assert before == generate(model.eval(), prompts, 8, eos_token_ids=sorted(llm.eos_token_ids))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.detach().float().std().clamp(min=0.02))
    after = greedy()
    assert stage.backend.llm is llm
    assert after != before
    assert after == generate(model.eval(), prompts, 8, eos_token_ids=sorted(llm.eos_token_ids))


@pytest.mark.parametrize("quant", [{}, {"qlora": True, "quantize_embeddings": True}], ids=["lora", "qlora-nf4-embeddings"])
def test_grpo_lora_reference_is_the_base(env, tmp_path, quant):
    """With LoRA and beta > 0 the reference is the adapter-free base: KL starts at 0, only adapters train.
    Also with QLoRA and NF4 embeddings: rollouts run the engine on the quantized live policy."""
    raw = raw_cfg(env, tmp_path / "run", {"num_generations": 4, "beta": 0.1, "reward_fn": f"{HERE}:len_reward"})
    raw["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **quant}
    cfg = load_config(raw=raw, stage="grpo")
    tok = Tokenizer.from_dir(str(env["model"]))
    stage = GRPO(cfg, tok)
    res = train(stage, cfg)
    rows = [r for r in res.metrics if "loss" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at init: policy == reference
    assert math.isfinite(rows[-1]["kl"]) and rows[-1]["kl"] >= 0
    assert stage.reference is not None and stage.reference.model is None  # no copy kept
    assert (res.final_dir / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- PPO
def test_ppo_rewards_at_last_token_and_returns(env, tmp_path):
    """kl_coef 0, γ = λ = 1, zero-initialised value head: every completion token's return is the
    sequence's score (reward only at the last token), and advantages are its whitened copy."""
    stage, model, extra = make_stage(PPO, env, tmp_path, {"kl_coef": 0.0, "gamma": 1.0, "lam": 1.0,
                                                          "num_generations": 2, "ppo_epochs": 1,
                                                          "reward_fn": f"{HERE}:len_reward"})
    assert isinstance(extra[0], ValueHead) and stage.reference is None
    examples = stage.load_dataset([str(env["data"])], "train")[:3]
    (mb,) = stage.rollout(model, examples)
    mask = mb["action_mask"]
    expect = mb["scores"][:, None].expand_as(mask)
    torch.testing.assert_close(mb["returns"][mask], expect[mask])
    assert float(mb["old_values"].abs().max()) == 0.0
    a = mb["advantages"][mask]
    assert abs(float(a.mean())) < 1e-5 and float(a.std()) == pytest.approx(1.0, rel=1e-3)


def test_ppo_kl_penalty_per_token(env, tmp_path):
    stage, model, _ = make_stage(PPO, env, tmp_path, {"kl_coef": 0.5, "gamma": 1.0, "lam": 1.0, "num_generations": 2,
                                                      "reward_fn": f"{HERE}:len_reward"})
    examples = stage.load_dataset([str(env["data"])], "train")[:2]
    with torch.no_grad():  # move the policy away from the frozen reference copy
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    mb = stage.rollout(model, examples)[0]
    mask = mb["action_mask"]
    ref = stage.reference.logps(model, mb, 1.0)
    # with V = 0 and γ = λ = 1, the return at the first completion token is the whole episode's reward:
    # score - kl_coef * sum_t (log π_old - log π_ref)
    first = mask.long().argmax(-1)
    rows = torch.arange(mask.shape[0])
    expect = mb["scores"] - 0.5 * ((mb["old_logps"] - ref) * mask).sum(-1)
    torch.testing.assert_close(mb["returns"][rows, first], expect, atol=1e-4, rtol=1e-4)


def test_ppo_trains_policy_and_value_head(env, tmp_path):
    cfg = load_config(raw=raw_cfg(env, tmp_path / "run", {"num_generations": 2, "ppo_epochs": 2, "num_minibatches": 2,
                                                          "reward_fn": f"{HERE}:len_reward"}, max_steps=3),
                      stage="ppo")
    res = train("ppo", cfg)
    rows = [r for r in res.metrics if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    for k in ("score", "kl", "clipfrac", "vf_loss", "values", "completion_len"):
        assert k in rows[0], k
    assert changed(params(load_model(str(env["model"]))), params(load_model(str(res.final_dir))))
    from safetensors.torch import load_file

    head = load_file(str(res.final_dir / "value_head.safetensors"))
    assert float(head["v_head.weight"].abs().sum()) > 0  # zero-initialised, then trained


def test_ppo_with_reward_model_and_value_model(env, tmp_path):
    """Reward from an RM folder (score at the last token of prompt + completion), critic from the same folder."""
    from lmstack.train.algos.rm import load_reward_model, sequence_scores

    tok = Tokenizer.from_dir(str(env["model"]))
    torch.manual_seed(0)
    rm = load_reward_model(str(env["model"]), tok.pad_token_id)
    rm_dir = tmp_path / "rm"
    save_model(rm, rm_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (rm_dir / f).write_bytes((env["model"] / f).read_bytes())
    stage, model, extra = make_stage(PPO, env, tmp_path / "run", {"reward_model": str(rm_dir), "value_model": str(rm_dir),
                                                                  "num_generations": 2, "kl_coef": 0.0})
    examples = stage.load_dataset([str(env["data"])], "train")[:2]
    (mb,) = stage.rollout(model, examples)[:1]
    # the scores are the RM's at each row's last real token
    lengths = mb["action_mask"].long().cumsum(-1).argmax(-1) + 2
    rm2 = load_model(str(rm_dir))
    with torch.no_grad():
        want = sequence_scores(rm2, {"tokens": mb["tokens"], "positions": mb["positions"], "lengths": lengths})
    torch.testing.assert_close(mb["scores"], want, atol=1e-4, rtol=1e-4)
    # one optimizer step through the loop moves the separate critic
    cfg = load_config(raw=raw_cfg(env, tmp_path / "run2", {"reward_model": str(rm_dir), "value_model": str(rm_dir),
                                                           "num_generations": 2}, max_steps=1), stage="ppo")
    res = train("ppo", cfg)
    critic = load_model(str(res.final_dir / "value_model"))
    assert changed(params(rm2), params(critic))


def test_pack_layout():
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b["tokens"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # position t predicts token t+1: completions start after the prompt's last position
    assert b["action_mask"].tolist() == [[False, False, True, True], [True, True, True, False]]
    assert b["targets"][b["action_mask"]].tolist() == [1, 2, 3, 4, 9]


def digit_reward(completion: str, answer) -> float:
    """Share of characters that are digits: a policy can raise it by emitting digit tokens."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def test_bf16_training_rolls_out_in_bf16(env, tmp_path):
    """training.precision bf16 on a CPU with native bf16: rollouts run bf16 linears and K/V unless
    algo.engine_args names a dtype; fp32 training keeps fp32 rollouts."""
    from lmstack.train.algos._rollout import bf16_rollouts_supported

    stage, model, _ = make_stage(GRPO, env, tmp_path / "a", {"num_generations": 2}, precision="bf16")
    assert model.dtype == torch.float32
    expect = torch.bfloat16 if bf16_rollouts_supported(model) else torch.float32
    assert stage.backend.llm.runner.kv_dtype == expect
    stage, _, _ = make_stage(GRPO, env, tmp_path / "b", {"num_generations": 2})
    assert stage.backend.llm.runner.kv_dtype == torch.float32
    stage, _, _ = make_stage(GRPO, env, tmp_path / "c", {"num_generations": 2, "engine_args": {"dtype": "float32"}},
                             precision="bf16")
    assert stage.backend.llm.runner.kv_dtype == torch.float32
