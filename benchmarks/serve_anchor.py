"""The fair serving anchor: `lmstack serve` against llama.cpp's own `llama-server`, same client, same run.

What a user would pick instead of `lmstack serve` on a CPU is `llama-server` with parallel slots
(continuous batching), not llama-cpp-python's one-sequence-at-a-time `Llama`. Both servers get the
same weights (a random-weight model with Qwen2.5-0.5B's shape, ../shared/bench_models), the same
workload and the same streaming OpenAI `/v1/completions` client:

  the 64-request mix of benchmarks/throughput.py: inputs uniform in [32, 512] tokens, outputs in
  [32, 256] (greedy, ignore_eos), sent by 1, 16 and 64 concurrent clients (the 1-client level runs
  the first --one-client-requests requests of the mix: single stream does not depend on how many);

at three widths: lmstack bf16 / int8 / int4 against the BF16 / Q8_0 / Q4_0 GGUF of the same weights
(every linear quantized, the LM head included, as in the GGUF). llama-server runs with
--parallel = the largest client count, a context of that many times one request's maximum, and as
many threads as lmstack uses; the Q4_0 file runs with --no-repack, because this build segfaults at
start-up repacking Q4_0 weights on this CPU (the class of bug in llama.cpp#16479). Reported per (width, clients): output tok/s, TTFT p50 / p99,
inter-token latency p50 / p99, and lmstack / llama-server ratios (targets: >= 1.5x output tok/s at
16 and 64 clients, TTFT p50 no worse).

    python benchmarks/serve_anchor.py [--layers 24] [--levels 1,16,64] [--widths 16,8,4] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from _engine_common import bench_config, random_model, table  # noqa: E402
from _llama_server import find_or_build  # noqa: E402
from llamacpp import byte_tokenizer  # noqa: E402
from serve import free_port, percentile  # noqa: E402

from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.model.loading import save_model  # noqa: E402

WIDTHS = {16: (None, "bf16"), 8: ("int8", "q8_0"), 4: ("int4", "q4_0")}


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(300, vocab) for _ in range(rng.randint(32, 512))], rng.randint(32, 256))
            for _ in range(n)]


async def one(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"].get("completion_tokens")
            # random weights mostly pick ids past the small test vocabulary, which decode to "": a
            # chunk is a token whatever its text (both servers stream one chunk per token and step)
            if ev.get("choices") and ev["choices"][0].get("finish_reason") is None:
                times.append(time.perf_counter())
    return {"start": t0, "times": times, "tokens": usage if usage is not None else len(times)}


async def level(url: str, reqs: list[tuple[list[int], int]], clients: int) -> dict:
    import httpx

    results: list[dict] = []
    queue = list(reversed(reqs))

    async def worker(c) -> None:
        while queue:
            p, m = queue.pop()
            results.append(await one(c, url, p, m))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as c:
        await asyncio.gather(*(worker(c) for _ in range(clients)))
    dt = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"tok_s": sum(r["tokens"] for r in results) / dt, "ttft50": percentile(ttft, 50),
            "ttft99": percentile(ttft, 99), "itl50": percentile(itl, 50), "itl99": percentile(itl, 99)}


def start(cmd: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 600:
            proc.kill()
            raise SystemExit(f"{cmd[0]} did not become healthy in 600 s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(cmd: list[str], port: int, levels: list[int], reqs: list, one_client: int, env: dict | None) -> dict:
    proc = start(cmd, port, env)
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        asyncio.run(level(url, [(reqs[0][0][:32], 4)], 1))  # warm-up
        out = {}
        for n in levels:
            t0 = time.monotonic()
            out[n] = asyncio.run(level(url, reqs[:one_client] if n == 1 else reqs, n))
            print(f"  {Path(cmd[0]).name if 'llama' in cmd[0] else 'lmstack'} {n} clients: "
                  f"{out[n]['tok_s']:.1f} tok/s ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        return out
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (default: the real 24)")
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--widths", default="16,8,4")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--one-client-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    widths = [int(x) for x in a.widths.split(",")]
    exe, why = find_or_build()
    if exe is None:
        print(f"llama-server column skipped: {why}", file=sys.stderr)
    cfg = bench_config(a.layers)
    reqs = workload(a.requests, cfg.vocab_size)
    ctx = 512 + 256 + 16
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "bf16"
        save_model(random_model(cfg, torch.float32), d, dtype=torch.bfloat16)
        byte_tokenizer(d)
        for w in widths:
            method, ty = WIDTHS[w]
            folder = d
            if method is not None:
                folder = Path(tmp) / method
                subprocess.run([sys.executable, "-m", "lmstack.cli", "quantize", "--model", str(d), "--method",
                                method, "--out", str(folder), "--skip"], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            port = free_port()
            ours = measure([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(folder), "--port", str(port),
                            "--served-model-name", "bench", "--max-num-seqs", str(max(levels)),
                            "--max-model-len", str(ctx)], port, levels, reqs, a.one_client_requests, env)
            theirs = None
            if exe is not None:
                gguf = export_gguf(d, Path(tmp) / f"m-{ty}.gguf", ty)
                port = free_port()
                theirs = measure([str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                  "--parallel", str(max(levels)), "-c", str(ctx * max(levels)),
                                  "--threads", str(a.threads), "--threads-batch", str(a.threads), "--no-webui"]
                                 + (["--no-repack"] if ty == "q4_0" else []),
                                 port, levels, reqs, a.one_client_requests, None)
            for n in levels:
                o = ours[n]
                t = theirs[n] if theirs else None
                f = (lambda k, s=1e3: f"{t[k] * s:.0f}" if t else "-")
                rows.append([f"{w}-bit", str(n), f"{o['tok_s']:.1f}", f(("tok_s"), 1) if t else "-",
                             f"{o['tok_s'] / t['tok_s']:.2f}x" if t else "-",
                             f"{o['ttft50'] * 1e3:.0f} / {o['ttft99'] * 1e3:.0f}",
                             f"{f('ttft50')} / {f('ttft99')}",
                             f"{o['itl50'] * 1e3:.0f} / {o['itl99'] * 1e3:.0f}", f"{f('itl50')} / {f('itl99')}"])
    print(f"\nQwen2.5-0.5B shape ({cfg.num_layers} layers), random weights; {a.requests}-request mix (inputs "
          f"32-512, outputs 32-256; 1 client: first {a.one_client_requests}); {a.threads} threads each; "
          f"lmstack bf16/int8/int4 vs llama-server BF16/Q8_0/Q4_0")
    print(table(rows, ["width", "clients", "lmstack tok/s", "llama-server tok/s", "ratio (>=1.5)",
                       "lmstack TTFT p50/p99 ms", "llama-server TTFT p50/p99 ms", "lmstack ITL p50/p99 ms",
                       "llama-server ITL p50/p99 ms"]))


if __name__ == "__main__":
    main()
