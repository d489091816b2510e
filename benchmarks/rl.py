"""One GRPO step and one PPO step on a random-weight SmolLM2-135M-shape policy, rollouts through the
lmstack engine versus through HF transformers `generate` (what TRL does without vLLM).

    python benchmarks/rl.py            # 8 prompts x G=8 (GRPO), 32 prompts (PPO), 64-token prompts, 128 new tokens
    python benchmarks/rl.py --quick    # 4 prompts x G=4, 16 prompts (PPO), 32-token prompts, 32 new tokens;
                                       # the HF column times generation only (the rest is the same code)
    python benchmarks/rl.py --stop-ids 2000   # variable completion lengths (see below)
    python benchmarks/rl.py --gen-only --stages grpo --prompts 2 --prompt-len 384 --max-tokens 16  # long prompts
    python benchmarks/rl.py --rollout-dtype fp32   # fp32 rollouts (default: bf16 where the CPU has native bf16)

Both columns run the same stage code (lmstack/train/algos/grpo.py, ppo.py); only the rollout backend
differs. The HF model is built over the SAME parameter tensors as the policy (load_state_dict with
assign=True), so both generate from the live weights. Time is split into generation / reference /
reward / old log-probs (+ values) / training (forward + backward + AdamW step). Prompts are random
token ids (the vocabulary is SmolLM2's 49152); the reward of a completion is a cheap Python function
of its token ids (GRPO: share of even ids; PPO: a random-weight reward model of the same shape).
Target: the generation phase >= 3x faster with the lmstack engine.

Precision: the policy trains in fp32. `--rollout-dtype bf16` (the default on CPUs with native bf16,
AVX512-BF16 / AMX, as for the engine's and train.py's defaults) is what mixed-precision training
does: the engine runs its linears on packed bf16 roundings of the live fp32 weights
(`LLM.from_model(policy, dtype="bfloat16")`, set by `algo.engine_args`), and HF generate runs under
`torch.autocast(bf16)`, as TRL's generate does under Accelerate's bf16 mixed precision. `--rollout-dtype fp32` generates in fp32 in both columns.

Random weights never say EOS, so by default every completion runs to max_tokens (equal work, the
worst case for continuous batching). Real RL completions end at very different lengths; `--stop-ids
N` makes the N lowest non-special token ids end a completion in BOTH backends (HF keeps computing a
finished row until the whole batch is done, as TRL's generate does; the engine drops it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._engine_common import random_model, table  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.train.algos._rollout import Completion, RLExample  # noqa: E402

BENCH_DIR = ROOT.parent / "shared" / "bench_models" / "smollm2-135m"


class IdTokenizer:
    """What a stage needs from a tokenizer when prompts are given as token ids."""

    def __init__(self, pad: int, eos: int) -> None:
        self.pad_token_id, self.eos_token_ids, self.bos_token_id = pad, [eos], None


def parity_reward(completion: str, answer) -> float:
    ids = completion.split()
    return sum(int(t) % 2 == 0 for t in ids) / max(1, len(ids))


class IdsAsText:
    """Wraps a rollout backend; a completion's text is its token ids (for the benchmark's reward)."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def generate(self, *a, **k) -> list[list[Completion]]:
        out = self.inner.generate(*a, **k)
        for g in out:
            for c in g:
                c.text = " ".join(map(str, c.token_ids))
        return out


class HFRollout:
    """Rollouts with transformers' LlamaForCausalLM.generate over the policy's own parameter tensors."""

    name = "HF generate"

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, autocast_bf16: bool = False) -> None:
        import transformers as tf

        self.autocast_bf16 = autocast_bf16

        hcfg = tf.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
        hcfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = tf.LlamaForCausalLM(hcfg)
        sd = {k: v for k, v in model.state_dict().items()}
        missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)  # shares the tensors: live weights
        missing = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"weight names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.tie_embeddings:
            hf.lm_head.weight = hf.model.embed_tokens.weight
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg)
        assert hf.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        self.hf, self.eos = hf.eval(), list(cfg.eos_token_ids)

    @torch.no_grad()
    def generate(self, model, prompts, n, max_tokens, temperature, top_p=1.0, top_k=0, seeds=None):
        # TRL's unwrapped_model.generate: one left-padded batch, num_return_sequences = G
        P = max(map(len, prompts))
        pad = self.eos[0]
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            att[i, P - len(p):] = 1
        if seeds:
            torch.manual_seed(seeds[0] % 2**63)
        was = model.training
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            out = self.hf.generate(input_ids=ids, attention_mask=att, do_sample=temperature > 0,
                                   temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n,
                                   max_new_tokens=max_tokens, pad_token_id=pad, eos_token_id=self.eos)
        model.train(was)
        res = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                toks = out[i * n + j, P:].tolist()
                stop = next((k for k, t in enumerate(toks) if t in self.eos), None)
                toks = toks if stop is None else toks[:stop + 1]
                group.append(Completion(toks, "", "stop" if stop is not None else "length"))
            res.append(group)
        return res


def build_stage(kind: str, model: torch.nn.Module, cfg: ModelConfig, a: argparse.Namespace):
    from lmstack.train.algos.grpo import GRPO
    from lmstack.train.algos.ppo import PPO
    from lmstack.train.config import load_config

    prompts = a.prompts if kind == "grpo" else a.ppo_prompts
    algo = {"max_tokens": a.max_tokens, "max_prompt_len": a.prompt_len, "logp_rows": 8,
            "engine_args": {"dtype": "bfloat16" if a.rollout_dtype == "bf16" else "auto"}}
    if kind == "grpo":
        algo.update(num_generations=a.G, beta=0.04)
    else:
        algo.update(kl_coef=0.05, ppo_epochs=1)
    # the rollout trains as grad_accum micro-batches (one optimizer step): a 64 x 192-token fp32 batch in
    # one piece peaks near 23 GB
    ga = max(1, min(a.grad_accum, prompts))
    raw = {"model": {"path": str(BENCH_DIR)}, "data": {"train": ["unused.jsonl"]},
           "training": {"batch_size": max(1, prompts // ga), "grad_accum": ga, "max_steps": 1, "device": "cpu"},
           "algo": algo}
    tc = load_config(raw=raw, stage=kind)
    tok = IdTokenizer(pad=cfg.eos_token_ids[0], eos=cfg.eos_token_ids[0])
    stage = (GRPO if kind == "grpo" else PPO)(tc, tok)
    stage.reward_fn = parity_reward
    return stage, prompts


def one_step(kind: str, backend_name: str, model, cfg: ModelConfig, a: argparse.Namespace, rm=None) -> dict[str, float]:
    from lmstack.train.distributed import DistInfo
    from lmstack.train.loop import forward_backward

    stage, n_prompts = build_stage(kind, model, cfg, a)
    extra = stage.setup(model, torch.device("cpu"))
    if kind == "ppo":
        stage.reward_model = rm
    llm = stage.backend.llm
    llm.tokenizer = None  # token ids in, token ids out (no detokenizer)
    stops = list(range(1, 1 + a.stop_ids))  # id 0 is SmolLM2's EOS / BOS
    llm.eos_token_ids |= set(stops)
    if backend_name == "lmstack":
        inner = stage.backend
    else:
        inner = HFRollout(model, cfg, autocast_bf16=a.rollout_dtype == "bf16")
        inner.eos += stops
    stage.backend = IdsAsText(inner)
    g = torch.Generator().manual_seed(0)
    examples = [RLExample(torch.randint(1 + a.stop_ids, cfg.vocab_size, (a.prompt_len,), generator=g).tolist(), [], None)
                for _ in range(n_prompts)]
    # warm-up (allocations, first-call overheads): 2 tokens of one prompt
    stage.backend.generate(model, [examples[0].prompt_ids], 1, 2, temperature=1.0)
    if a.gen_only or (a.quick and backend_name == "hf"):  # generation only: the other phases run the same code
        n = a.G if kind == "grpo" else 1
        t0 = time.perf_counter()
        groups = stage.sample(model, examples, n)
        dt = time.perf_counter() - t0
        return {"generation": dt, "gen_tokens": float(sum(len(c.token_ids) for g_ in groups for c in g_))}
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in extra for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    model.train()
    stage.timings.reset()
    t0 = time.perf_counter()
    mbs = stage.rollout(model, examples)
    t1 = time.perf_counter()
    step_mbs = mbs[:stage.cfg.training.grad_accum]  # 1 epoch x 1 minibatch: the whole rollout, one step
    forward_backward(stage, model, step_mbs, torch.autocast("cpu", enabled=False), params, DistInfo())
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    ph = dict(stage.timings.phases)
    ph["training"] = t2 - t1
    ph["total"] = t2 - t0
    ph["gen_tokens"] = float(sum(mb["action_mask"].sum() for mb in step_mbs))
    del opt
    return ph


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, help="GRPO prompts per step (default 8; --quick 4)")
    ap.add_argument("--G", type=int, help="GRPO completions per prompt (default 8; --quick 4)")
    ap.add_argument("--ppo-prompts", type=int, help="PPO prompts per step (default 32; --quick 16)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens (default 64; --quick 32)")
    ap.add_argument("--max-tokens", type=int, help="new tokens per completion (default 128; --quick 32)")
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers (0: SmolLM2's 30)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stages", default="grpo,ppo")
    ap.add_argument("--gen-only", action="store_true", help="time only the generation phase in both columns")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches the rollout trains in (one step)")
    ap.add_argument("--rollout-dtype", choices=("fp32", "bf16"), default=None,
                    help="generation precision in both columns (the policy trains in fp32; see above); default "
                         "bf16 on CPUs with native bf16, else fp32")
    ap.add_argument("--stop-ids", type=int, default=0, help="token ids 1..N also end a completion (variable lengths)")
    a = ap.parse_args()
    sizes = dict(prompts=(8, 4), G=(8, 4), ppo_prompts=(32, 16), prompt_len=(64, 32), max_tokens=(128, 32))
    for k, (full, quick) in sizes.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    torch.set_num_threads(a.threads)
    if a.rollout_dtype is None:
        from lmstack.precision import auto_dtype

        a.rollout_dtype = "bf16" if auto_dtype() == torch.bfloat16 else "fp32"
    if not (BENCH_DIR / "config.json").is_file():
        raise SystemExit(f"missing {BENCH_DIR / 'config.json'} (the SmolLM2-135M shape)")
    cfg = ModelConfig.from_hf(BENCH_DIR)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    print(f"policy: random SmolLM2-135M shape ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}), fp32, rollouts in {a.rollout_dtype}, {a.threads} threads; prompts {a.prompt_len} tokens, up to {a.max_tokens} new")

    rm = None
    results: dict[tuple[str, str], dict[str, float]] = {}
    for kind in [s for s in a.stages.split(",") if s]:
        if kind == "ppo" and rm is None:
            rm_cfg = cfg.replace(head="score", num_labels=1, tie_embeddings=False, pad_token_id=cfg.eos_token_ids[0])
            rm = random_model(rm_cfg, torch.float32, seed=1).requires_grad_(False)
        for backend in ("lmstack", "hf"):
            model = random_model(cfg, torch.float32, seed=0).train().requires_grad_(True)
            results[(kind, backend)] = one_step(kind, backend, model, cfg, a, rm)
            r = results[(kind, backend)]
            print(f"  {kind} / {backend}: generation {r['generation']:.1f}s"
                  + (f", whole step {r['total']:.1f}s" if "total" in r else ""), flush=True)
            del model

    phases = ["generation", "reference", "reward", "old_logps", "training", "total"]
    for kind in [s for s in a.stages.split(",") if s]:
        L, H = results[(kind, "lmstack")], results[(kind, "hf")]
        desc = (f"{a.prompts} prompts x G={a.G}" if kind == "grpo" else f"{a.ppo_prompts} prompts x 1")
        rows = []
        for p in phases if "total" in L else ["generation"]:
            lv = L.get(p, 0.0)
            if p not in H:  # --quick: HF generation only; the other phases are the same code
                hv = lv - L["generation"] + H["generation"] if p == "total" else lv
                hs = f"{hv:.2f} (same code)" if p != "total" else f"{hv:.2f} (est.)"
            else:
                hv = H[p]
                hs = f"{hv:.2f}"
            rows.append([p + " (s)", f"{lv:.2f}", hs, f"{hv / lv:.2f}x" if lv > 0 else "-"])
        rows.append(["generated tokens", f"{L['gen_tokens']:.0f}", f"{H['gen_tokens']:.0f}", ""])
        n_seq = a.prompts * a.G if kind == "grpo" else a.ppo_prompts
        rows.append(["mean completion length", f"{L['gen_tokens'] / n_seq:.1f}", f"{H['gen_tokens'] / n_seq:.1f}", ""])
        rows.append(["generation tok/s", f"{L['gen_tokens'] / L['generation']:.0f}",
                     f"{H['gen_tokens'] / H['generation']:.0f}",
                     f"{(L['gen_tokens'] / L['generation']) / (H['gen_tokens'] / H['generation']):.2f}x"])
        print(f"\n{kind.upper()} step ({desc}; stop ids {a.stop_ids}):")
        print(table(rows, ["phase", "lmstack engine", "HF generate", "HF / lmstack"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
