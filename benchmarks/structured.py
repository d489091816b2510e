"""Throughput cost of structured output: every request constrained vs none, lmstack engine, batch 16.

Model: random weights with SmolLM2-135M's exact shape (../shared/bench_models/smollm2-135m: 30
layers, 49152-token vocabulary); tokenizer: a 49152-token byte-level BPE trained here on generated
text (benchmarks/_bpe_vocab.py; no download). Workload: --num-requests requests of random prompts
(32-64 tokens), at most 16 running at once (max_num_seqs=16), temperature 1 with a seed per request,
`ignore_eos`, up to --max-tokens tokens each. Columns:
  - unconstrained: no structured_outputs (every request runs to max_tokens);
  - json_schema: every request under a nested JSON schema (compact whitespace, so outputs move
    through the structure); a request ends when its JSON is complete;
  - mixed: requests cycle through json_schema / json_object / regex / grammar / choice.
tokens/s (batch 16) is measured over the engine steps that generate a token for all 16 running
sequences and compute no prompt token (pure decode at full batch): constrained requests end early, so whole-run tokens/s (also
shown) mixes in a batch that drains. Requests beyond 16 wait in the queue and refill the batch as
others finish. The workloads run --rounds times, interleaved
(so drift from other load on the machine hits all of them alike); the table shows each one's median
round. The cost is 1 - constrained / unconstrained tokens/s. Also printed: mask time (bitmask fill +
apply) per step, measured inside the same runs.
Grammar compilation and the llguidance tokenizer (built once per engine) are warmed up first.

Result (2 cores of a Sapphire-Rapids-class Xeon with AMX, bf16, shared with other jobs): tok/s at
batch 16, unconstrained 757, json_schema 701 (cost 7.4%), mixed 675 (10.8%); the masks take 1.5 ms
of a ~21 ms step (6%). Two more 2-thread runs gave 10.6-10.9% for both; --threads 1: 2.1% / 5.0%.

    python benchmarks/structured.py [--num-requests 64] [--max-tokens 96] [--layers N] [--threads N] [--rounds 3]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from _bpe_vocab import bpe_tokenizer
from _engine_common import ROOT, pick_dtype, random_model, table

import torch

from lmstack.config import ModelConfig
from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.structured import StructuredOutputsParams as SO
from lmstack.engine.structured import mask as mask_mod
from lmstack.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,16}@[a-z]{2,10}\\.(com|org)$"},
        "roles": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "roles", "address", "active"],
}
MIXED = [SO(json=SCHEMA, disable_any_whitespace=True), SO(json_object=True, disable_any_whitespace=True),
         SO(regex=r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12}){0,3}, [0-9]{1,3} years"),
         SO(grammar='root ::= "SELECT " col (", " col)* " FROM " col ";"\ncol ::= [a-z_] [a-z0-9_]{0,10}\n'),
         SO(choice=["positive", "negative", "neutral", "mixed feelings"])]


def find_config() -> Path:
    for d in (ROOT, *ROOT.parents):
        p = d / "shared" / "bench_models" / "smollm2-135m"
        if (p / "config.json").is_file():
            return p
    raise SystemExit("missing shared/bench_models/smollm2-135m/config.json (SmolLM2-135M's shape)")


class Timers:
    """Per engine step: wall time and tokens generated; and the time inside structured.mask's
    apply_grammar_masks (bitmask fill + apply to the logits)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.steps: list[tuple[float, int, int]] = []  # (seconds, tokens generated, prompt tokens computed)
        self.mask_s = 0.0
        self.mask_calls = 0

    def __enter__(self) -> "Timers":
        llm, orig_step, orig_mask = self.llm, self.llm.step, mask_mod.apply_grammar_masks

        def step():
            n, p, t = llm._num_generated, llm._num_prompt_tokens, time.perf_counter()
            out = orig_step()
            self.steps.append((time.perf_counter() - t, llm._num_generated - n, llm._num_prompt_tokens - p))
            return out

        def masks(*a, **k):
            t = time.perf_counter()
            orig_mask(*a, **k)
            self.mask_s += time.perf_counter() - t
            self.mask_calls += 1

        llm.step, mask_mod.apply_grammar_masks = step, masks
        self._orig = orig_step, orig_mask
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.step  # back to the class's method
        mask_mod.apply_grammar_masks = self._orig[1]

    def full_batch(self, batch: int) -> tuple[float, int]:
        """tokens/s over the steps that generated a token for every one of `batch` sequences (pure
        decode steps at full batch: no prefill, no draining tail), and how many such steps there were."""
        full = [(t, n) for t, n, p in self.steps if n == batch and p == 0]
        return sum(n for _, n in full) / max(sum(t for t, _ in full), 1e-9), len(full)


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], batch: int) -> dict:
    with Timers(llm) as tm:
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t
    comps = [c for o in outs for c in o.outputs]
    reasons: dict[str, int] = {}
    for c in comps:
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    ntok = sum(len(c.token_ids) for c in comps)
    full_tps, nfull = tm.full_batch(batch)
    return dict(dt=dt, ntok=ntok, tps=ntok / dt, full_tps=full_tps, nfull=nfull, reasons=reasons,
                mask_ms=1e3 * tm.mask_s / tm.mask_calls if tm.mask_calls else None,
                mask_share=tm.mask_s / dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16, help="max_num_seqs")
    ap.add_argument("--layers", type=int, help="override the number of layers (default: all 30)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch (and mask) threads; default torch's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_hf(find_config())
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    dtype = pick_dtype(args.dtype)
    print(f"building a {cfg.vocab_size}-token BPE and a random {cfg.num_layers}-layer SmolLM2-135M-shape "
          f"model ({dtype}) ...", flush=True)
    tok = Tokenizer(bpe_tokenizer(cfg.vocab_size), config={"eos_token": "<|im_end|>"})
    model = random_model(cfg, dtype, seed=args.seed)
    llm = LLM.from_model(model, tokenizer=tok, max_num_seqs=args.batch, max_model_len=512,
                         kv_cache_memory=256 << 20)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(32, 64))] for _ in range(args.num_requests)]

    def params(so):
        return [SamplingParams(temperature=1.0, seed=args.seed + i, max_tokens=args.max_tokens, ignore_eos=True,
                               structured_outputs=so(i)) for i in range(len(prompts))]

    workloads = {
        "unconstrained": params(lambda i: None),
        "json_schema": params(lambda i: MIXED[0]),
        "mixed": params(lambda i: MIXED[i % len(MIXED)]),
    }
    t = time.perf_counter()
    llm._grammar_compiler()
    print(f"llguidance tokenizer: {time.perf_counter() - t:.2f} s (once per engine)", flush=True)
    for ps in workloads.values():  # warm-up: kernels, grammar compilation and lexer caches
        llm.generate(prompts[:args.batch], ps[:args.batch])
    runs: dict[str, list] = {name: [] for name in workloads}
    for r in range(args.rounds):
        for name, ps in workloads.items():
            res = run(llm, prompts, ps, args.batch)
            runs[name].append(res)
            print(f"round {r + 1}: {name} {res['full_tps']:.1f} tok/s at full batch", flush=True)
    rows, base = [], None
    for name, rs in runs.items():
        m = sorted(rs, key=lambda x: x["full_tps"])[len(rs) // 2]  # the median round
        base = base or m["full_tps"]
        rows.append([name, f"{m['ntok']}", f"{m['tps']:.1f}", f"{m['nfull']}", f"{m['full_tps']:.1f}",
                     f"{m['full_tps'] / base:.3f}", f"{100 * (1 - m['full_tps'] / base):.1f}%",
                     f"{m['mask_ms']:.2f}" if m["mask_ms"] is not None else "-",
                     f"{100 * m['mask_share']:.1f}%" if m["mask_ms"] is not None else "-",
                     " ".join(f"{k}:{v}" for k, v in sorted(m["reasons"].items()))])
    print(f"\n{args.num_requests} requests, batch {args.batch}, max_tokens {args.max_tokens}, median of "
          f"{args.rounds} interleaved rounds, {cfg.num_layers} layers, {dtype}, {torch.get_num_threads()} threads")
    print(table(rows, ["workload", "tokens", "tok/s (all)", "full steps", "tok/s (batch 16)", "ratio", "cost",
                       "mask ms/step", "mask share", "finish"]))


if __name__ == "__main__":
    main()
