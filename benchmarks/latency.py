"""Single-stream decode speed against the memory-bandwidth roofline.

One request at a time (batch 1) decodes `--output-len` tokens after a short prompt on a random-weight
model with Qwen2.5-0.5B's exact shape. At batch 1 every decode step must stream all weights the token
touches (decoder layers + LM head) from memory, so tokens/s <= copy bandwidth / weight bytes per token
(the roofline; the bandwidth is measured here with a 256 MiB tensor copy, read + write bytes).
Target: the engine at >= 70% of the roofline.

  default: prompt 32 tokens, 128 new tokens, all 24 layers
  --quick: prompt 32 tokens, 32 new tokens, 4 layers

Columns: lmstack engine (LLM.generate, n=1), lmstack reference generate, HF transformers generate.
Decode tokens/s excludes the first token (the prefill): (tokens - 1) / (end - first token time).

    python benchmarks/latency.py [--quick] [--dtype auto|bfloat16|float32] [--skip-hf]
"""
from __future__ import annotations

import argparse
import time

from _engine_common import bench_config, copy_bandwidth, hf_model, layer_matmul_params, pick_dtype, random_model, table

import torch

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.generate import generate_stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    out_len = a.output_len or (32 if a.quick else 128)
    dtype = pick_dtype(a.dtype)
    cfg = bench_config(a.layers or (4 if a.quick else None))
    model = random_model(cfg, dtype)
    prompt = list(range(100, 100 + a.prompt_len))
    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = (layer_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size) * elem
    bw = copy_bandwidth()
    roof = bw / weight_bytes
    print(f"model: Qwen2.5-0.5B shape, {cfg.num_layers} layers, {str(dtype).replace('torch.', '')}; "
          f"weights read per token {weight_bytes / 2**20:.0f} MiB; copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"roofline {roof:.1f} tok/s")
    rows = []

    llm = LLM.from_model(model)
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate([prompt[:4]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    m = llm.generate([prompt], sp)[0].metrics
    rows.append(["lmstack engine", 1.0 / m.time_per_output_token])

    def time_stream(stream) -> float:
        t_first = None
        n = 0
        for _ in stream:
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        return (n - 1) / (time.perf_counter() - t_first)

    rows.append(["lmstack reference generate", time_stream(generate_stream(model, [prompt], out_len))])

    if not a.skip_hf:
        import transformers as tf

        hf = hf_model(cfg, model, dtype)

        class Timer(tf.generation.BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        timer = Timer()
        with torch.no_grad():
            hf.generate(torch.tensor([prompt]), streamer=timer, generation_config=tf.GenerationConfig(
                max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0, eos_token_id=None))
        # put() is called with the prompt first, then once per new token
        ts = timer.times[1:]
        rows.append(["HF transformers generate", (len(ts) - 1) / (ts[-1] - ts[0])])

    print()
    print(table([[name, f"{tps:.1f}", f"{tps / roof:.0%}"] for name, tps in rows],
                ["system (batch 1)", "decode tok/s", "of roofline"]))


if __name__ == "__main__":
    main()
