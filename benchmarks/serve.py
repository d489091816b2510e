"""Serving benchmark: N concurrent streaming clients against `lmstack serve` on loopback.

    python benchmarks/serve.py                  # SmolLM2-135M shape, random weights, N = 1, 8, 32
    python benchmarks/serve.py --quick          # 4 layers, short prompts/outputs: a ~minute-long smoke run
    python benchmarks/serve.py --model DIR      # any HF folder (prompts are random token ids)

The server runs as a separate process (`python -m lmstack.cli serve`), so client and server do not
share a GIL. Each client sends streaming /v1/completions requests back to back (prompts are random
token ids, fixed output length with ignore_eos) until its share of the request count is done or the
per-N duration cap passes. Reported per N: requests/s, output tokens/s, time to first token (TTFT)
p50/p99 and inter-token latency (ITL, gap between consecutive streamed tokens) p50/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = ROOT.parent / "shared" / "bench_models" / "smollm2-135m" / "config.json"


def build_random_model(out_dir: Path, num_layers: int | None) -> Path:
    """Random weights in SmolLM2-135M's shape (or a small llama if that config is absent)."""
    import torch

    from lmstack.config import ModelConfig
    from lmstack.model.loading import save_model
    from lmstack.model.transformer import Transformer

    if SHAPE.is_file():
        cfg = ModelConfig.from_hf(SHAPE.parent)
    else:
        import transformers as tf

        tiny = Path(tempfile.mkdtemp())
        tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096).save_pretrained(tiny)
        cfg = ModelConfig.from_hf(tiny)
    if num_layers:
        cfg = cfg.replace(num_layers=num_layers)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    save_model(model.to(torch.bfloat16).eval(), out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    n_tokens = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n_tokens = ev["usage"]["completion_tokens"]
            if ev["choices"]:  # one chunk per engine step that produced tokens
                times.append(time.perf_counter())
    return {"start": t0, "times": times, "tokens": n_tokens}


async def run_level(url: str, model: str, concurrency: int, num_requests: int, duration: float,
                    prompt_len: tuple[int, int], max_tokens: int, vocab: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(num_requests)]
    results: list[dict] = []
    next_i = 0
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def worker(client) -> None:
        nonlocal next_i
        while next_i < num_requests and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            results.append(await one_request(client, url, model, prompts[i], max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"N": concurrency, "requests": len(results), "seconds": elapsed, "req_s": len(results) / elapsed,
            "tok_s": tokens / elapsed, "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "itl50": percentile(itl, 50), "itl99": percentile(itl, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: build a random SmolLM2-135M-shaped one)")
    ap.add_argument("--quick", action="store_true", help="small model, short requests, few of them")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2*N + 4; quick: N + 2)")
    ap.add_argument("--duration", type=float, default=None, help="cap in seconds per level (default 120; quick 40)")
    ap.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64; quick 16)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    duration = args.duration or (40.0 if args.quick else 120.0)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    prompt_len = (16, 64) if args.quick else (32, 256)

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else build_random_model(Path(tmp.name) / "model",
                                                                      num_layers=4 if args.quick else None)
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", "bench", "--dtype", args.dtype, "--max-num-seqs", str(max(levels)),
           "--max-model-len", str(prompt_len[1] + max_tokens + 16)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 180:
                raise SystemExit("server did not start within 180 s")
            time.sleep(0.5)
        url = base + "/v1/completions"
        # warm-up (first forward allocates and compiles nothing, but touches every weight)
        asyncio.run(run_level(url, "bench", 1, 1, 60, prompt_len, 4, vocab, seed=123))
        rows = []
        for n in levels:
            num = args.requests or (n + 2 if args.quick else 2 * n + 4)
            row = asyncio.run(run_level(url, "bench", n, num, duration, prompt_len, max_tokens, vocab, seed=n))
            rows.append(row)
            print(f"  N={n}: {row['requests']} requests in {row['seconds']:.1f} s", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()

    print(f"\nlmstack serve, {cfg.get('num_hidden_layers')} layers x {cfg.get('hidden_size')} hidden "
          f"(random weights, dtype {args.dtype}), prompts {prompt_len[0]}-{prompt_len[1]} tokens, "
          f"{max_tokens} output tokens, {os.cpu_count()} CPUs\n")
    head = f"{'N':>4} {'reqs':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} " \
           f"{'ITL p50':>8} {'ITL p99':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['N']:>4} {r['requests']:>5} {r['req_s']:>7.2f} {r['tok_s']:>10.1f} {r['ttft50'] * 1e3:>7.0f}ms "
              f"{r['ttft99'] * 1e3:>7.0f}ms {r['itl50'] * 1e3:>6.0f}ms {r['itl99'] * 1e3:>6.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
