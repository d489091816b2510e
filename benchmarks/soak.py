"""Soak: does `lmstack serve`'s memory stay flat under sustained, messy traffic?

Each round sends 110 requests against one server process: 100 streaming /v1/completions (30 of them
disconnect after their first few chunks) and 10 non-streaming ones whose clients give up after
0.3 s, 32 at a time, with prompts of 16-384 random token ids and 16-96 output tokens. After each
round, once the engine is idle, the server's resident memory (VmRSS from /proc) is printed. The
acceptance line compares round --rounds with round 5 (target: within 5%).

    python benchmarks/soak.py [--rounds 20] [--layers 4] [--model DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import build_random_model, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one(client, url: str, rng: random.Random, vocab: int, kind: str) -> str:
    import httpx

    body = {"model": "soak", "prompt": [rng.randrange(vocab) for _ in range(rng.randint(16, 384))],
            "max_tokens": rng.randint(16, 96), "ignore_eos": True, "temperature": 0.8, "seed": rng.randrange(1 << 30)}
    try:
        if kind == "give_up":
            await client.post(url, json=body, timeout=0.3)
            return "finished"
        async with client.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if kind == "disconnect" and n >= 3:
                    return "disconnected"
        return "finished"
    except httpx.TimeoutException:
        return "gave up"


async def round_(base: str, rng: random.Random, vocab: int) -> dict:
    import httpx

    kinds = ["disconnect"] * 30 + ["stream"] * 70 + ["give_up"] * 10
    rng.shuffle(kinds)
    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        async def guarded(k):
            async with sem:
                return await one(client, base + "/v1/completions", rng, vocab, k)

        outcomes = await asyncio.gather(*(guarded(k) for k in kinds))
    return {k: outcomes.count(k) for k in set(outcomes)}


def idle(base: str, timeout: float = 120) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = {ln.split()[0]: float(ln.split()[1]) for ln in httpx.get(base + "/metrics").text.splitlines()
             if ln and not ln.startswith("#")}
        if m["lmstack_num_requests_running"] == 0 and m["lmstack_num_requests_waiting"] == 0:
            return
        time.sleep(0.2)
    raise SystemExit("the engine did not go idle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4, help="layers of the SmolLM2-135M-shape random model")
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    import httpx

    from lmstack.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(a.model) if a.model else build_random_model(Path(tmp) / "m", a.layers)
        vocab = ModelConfig.from_hf(model).vocab_size
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--served-model-name", "soak", "--max-model-len", "512"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(600):
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            rng = random.Random(0)
            rss = []
            print(f"{'round':>5} {'RSS MB':>8} {'delta':>7} {'s':>5}  outcomes", flush=True)
            for r in range(1, a.rounds + 1):
                t0 = time.monotonic()
                out = asyncio.run(round_(base, rng, vocab))
                idle(base)
                rss.append(rss_mb(proc.pid))
                d = rss[-1] - rss[-2] if len(rss) > 1 else 0.0
                print(f"{r:>5} {rss[-1]:>8.1f} {d:>+7.1f} {time.monotonic() - t0:>5.0f}  {out}", flush=True)
            assert httpx.get(base + "/health").status_code == 200
        finally:
            proc.terminate()
            proc.wait(30)
    if len(rss) >= 5:
        ratio = rss[-1] / rss[4]
        print(f"\nRSS round {len(rss)} / round 5: {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} 5%)")


if __name__ == "__main__":
    main()
