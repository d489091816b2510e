"""Peak memory and time of naive vs sdpa vs tiled attention forward, 1k..16k tokens (bf16, CPU).

Each (impl, length) runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that run alone;
the reported figure is peak RSS minus the RSS after the inputs were allocated, i.e. the memory the
attention itself needed. Expected: naive grows quadratically (it materialises T x T scores), sdpa
and tiled linearly.

    python benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384] [--heads 2] [--kv-heads 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch
from lmstack.model.attention import attention
impl, T, H, Hkv, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
q = torch.randn(1, H, T, D, dtype=torch.bfloat16)
k = torch.randn(1, Hkv, T, D, dtype=torch.bfloat16)
v = torch.randn(1, Hkv, T, D, dtype=torch.bfloat16)
attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], impl=impl)  # warm up kernels / allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    t0 = time.perf_counter()
    out = attention(q, k, v, impl=impl)
    dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mib": (peak - base) / 1024, "ms": dt * 1e3}))
"""


def run_one(impl: str, T: int, H: int, Hkv: int, D: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, impl, str(T), str(H), str(Hkv), str(D)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"mib": float("nan"), "ms": float("nan"), "error": r.stderr.strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--impls", default="naive,sdpa,tiled")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    impls = a.impls.split(",")
    print(f"attention forward, bf16, B=1, H={a.heads}, Hkv={a.kv_heads}, D={a.head_dim}, causal; "
          "extra peak RSS (MiB) / time (ms)", flush=True)
    head = f"{'T':>6} | " + " | ".join(f"{i + ' MiB':>11} {i + ' ms':>10}" for i in impls) + " | tiled/naive mem"
    print(head)
    print("-" * len(head))
    t0 = time.time()
    for T in lengths:
        res = {i: run_one(i, T, a.heads, a.kv_heads, a.head_dim) for i in impls}
        cells = " | ".join(f"{res[i]['mib']:>11.1f} {res[i]['ms']:>10.1f}" for i in impls)
        ratio = ""
        if "naive" in res and "tiled" in res and res["naive"]["mib"] > 0:
            ratio = f"{res['tiled']['mib'] / res['naive']['mib']:.3f}"
        print(f"{T:>6} | {cells} | {ratio}", flush=True)
    print(f"(total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
