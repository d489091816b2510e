"""Time to first token with and without automatic prefix caching.

N requests share one long system prompt (1,000 tokens) followed by a short distinct user part
(10-40 tokens) and generate a few tokens each, on a random-weight model with Qwen2.5-0.5B's shape.
One earlier request with the same system prompt has already been served (the usual serving
situation: the system prompt recurs over time). Then all N requests arrive at once; TTFT is
measured per request from its arrival. Target: >= 5x lower mean TTFT with prefix caching.

  default: 32 requests, all 24 layers
  --quick: 8 requests, 4 layers

    python benchmarks/prefix_cache.py [--quick] [--dtype auto|bfloat16|float32]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from _engine_common import bench_config, pick_dtype, random_model, table

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams


def run(model, system: list[int], users: list[list[int]], caching: bool, max_tokens: int) -> tuple[list[float], float, float]:
    llm = LLM.from_model(model, enable_prefix_caching=caching)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([system + [7, 8, 9]], sp)  # an earlier request with the same system prompt
    t0 = time.perf_counter()
    outs = llm.generate([system + u for u in users], sp)
    total = time.perf_counter() - t0
    return [o.metrics.time_to_first_token for o in outs], total, llm.get_stats().prefix_cache_hit_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    a = ap.parse_args()
    n = a.num_requests or (8 if a.quick else 32)
    dtype = pick_dtype(a.dtype)
    cfg = bench_config(a.layers or (4 if a.quick else None))
    model = random_model(cfg, dtype)
    rng = random.Random(0)
    system = [rng.randrange(cfg.vocab_size) for _ in range(a.system_len)]
    users = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(10, 40))] for _ in range(n)]
    print(f"model: Qwen2.5-0.5B shape, {cfg.num_layers} layers, {str(dtype).replace('torch.', '')}; "
          f"{n} requests = {a.system_len}-token shared system prompt + 10-40 own tokens, {a.max_tokens} new tokens each")
    res = {c: run(model, system, users, c, a.max_tokens) for c in (False, True)}
    rows = []
    for c in (False, True):
        ttft, total, hit = res[c]
        rows.append(["on" if c else "off", f"{statistics.mean(ttft):.2f}", f"{statistics.median(ttft):.2f}",
                     f"{max(ttft):.2f}", f"{total:.1f}", f"{hit:.0%}"])
    print()
    print(table(rows, ["prefix caching", "mean TTFT (s)", "p50 TTFT (s)", "max TTFT (s)", "all done (s)", "hit rate"]))
    off, on = statistics.mean(res[False][0]), statistics.mean(res[True][0])
    print(f"\nmean TTFT {off / on:.1f}x lower with prefix caching")


if __name__ == "__main__":
    main()
