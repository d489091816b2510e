"""Offline throughput: lmstack engine vs HF transformers `generate` vs lmstack's reference generate.

Workload (fixed seed, `ignore_eos`, greedy): N requests with input lengths uniform in [in_min, in_max]
and output lengths uniform in [out_min, out_max], on a random-weight model with the exact shape of
Qwen2.5-0.5B (../shared/bench_models/qwen2.5-0.5b/config.json).

  default: 64 requests, inputs [32, 512], outputs [32, 256], all 24 layers
  --quick: 16 requests, inputs [32, 128], outputs [16, 64], 4 layers (same widths and vocab)

Columns: lmstack engine (continuous batching, paged KV); HF transformers generate (one padded batch
of all requests, left padding, sdpa, every row decoded to the longest requested output; only the
requested tokens are counted); lmstack reference generate one request at a time (measured on the
first --ref-requests requests; tokens/s does not depend on how many are measured).
Also printed: achieved FLOP/s of the engine as a fraction of this CPU's measured matmul peak in the
same dtype, and KV memory use (live tokens / allocated slots, paged vs one contiguous
max-length allocation per request).

    python benchmarks/throughput.py [--quick] [--dtype auto|bfloat16|float32] [--skip-hf] [--skip-ref]
dtype auto = bf16 where the CPU has native bf16 matmul (AVX512-BF16/AMX), else fp32; all columns use it.
"""
from __future__ import annotations

import argparse
import random
import time

from _engine_common import (bench_config, hf_model, layer_matmul_params, matmul_peak_flops, pick_dtype,
                            random_model, table)

import torch

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--layers", type=int, help="override the number of layers (default: 24, quick: 4)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--hf-dtype", default="same", choices=["same", "bfloat16", "float32"],
                    help="dtype of the HF column (the issue's spec is bf16; 'same' = lmstack's dtype)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--ref-requests", type=int, help="requests timed for the reference column (default all; quick 3)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    n = a.num_requests or (16 if a.quick else 64)
    in_min, in_max = a.input_len or ((32, 128) if a.quick else (32, 512))
    out_min, out_max = a.output_len or ((16, 64) if a.quick else (32, 256))
    layers = a.layers or (4 if a.quick else None)
    ref_n = a.ref_requests or (3 if a.quick else n)
    dtype = pick_dtype(a.dtype)

    cfg = bench_config(layers)
    model = random_model(cfg, dtype)
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(in_min, in_max))] for _ in range(n)]
    outs = [rng.randint(out_min, out_max) for _ in range(n)]
    n_out = sum(outs)
    n_in = sum(len(p) for p in prompts)
    print(f"model: Qwen2.5-0.5B shape, {cfg.num_layers} layers, random weights, {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads")
    print(f"workload: {n} requests, input {in_min}-{in_max} (total {n_in}), output {out_min}-{out_max} "
          f"(total {n_out}), greedy, ignore_eos")
    results = []

    # ---------------------------------------------------------------- lmstack engine
    llm = LLM.from_model(model, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                         enable_prefix_caching=False)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.add_request(f"b{i}", p, sp)
    live_frac, contig_frac, padded_frac, got = [], [], [], 0
    pad_len = max(len(p) for p in prompts) + max(outs)  # a padded batch reserves this per row
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                got += len(o.outputs[0].token_ids)
        st = llm.get_stats()
        running = llm.scheduler.running
        if st.kv_blocks_used:
            live_frac.append(st.kv_live_tokens / (st.kv_blocks_used * llm.block_size))
            reserved = sum(s.num_prompt_tokens + s.params.max_tokens for s in running)
            if reserved:
                contig_frac.append(st.kv_live_tokens / reserved)
                padded_frac.append(st.kv_live_tokens / (len(running) * pad_len))
    t_engine, c_engine = time.perf_counter() - t0, time.process_time() - c0
    assert got == n_out, (got, n_out)
    results.append(["lmstack engine", t_engine, n_out / t_engine, c_engine])
    st = llm.get_stats()

    # FLOPs the engine did: layer matmuls on every computed token, LM head on every sampled token,
    # attention (QK^T and PV) over each token's context
    P = layer_matmul_params(cfg)
    attn_ctx = sum(sum(range(len(p) + o)) for p, o in zip(prompts, outs))  # sum over tokens of context length
    flops = (2 * P * (n_in + n_out) + 2 * cfg.hidden_size * cfg.vocab_size * n_out
             + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attn_ctx)
    peak = matmul_peak_flops(dtype)

    # ---------------------------------------------------------------- HF transformers
    if not a.skip_hf:
        import transformers as tf

        hf_dtype = dtype if a.hf_dtype == "same" else pick_dtype(a.hf_dtype)
        hf = hf_model(cfg, model, hf_dtype)
        T = max(len(p) for p in prompts)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        gc = tf.GenerationConfig(max_new_tokens=max(outs), min_new_tokens=max(outs), do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:],
                        generation_config=tf.GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0))
            t0, c0 = time.perf_counter(), time.process_time()
            hf.generate(ids, attention_mask=mask, generation_config=gc)
            t_hf, c_hf = time.perf_counter() - t0, time.process_time() - c0
        results.append([f"HF transformers generate (padded batch, {str(hf_dtype).replace('torch.', '')})",
                        t_hf, n_out / t_hf, c_hf])
        del hf

    # ---------------------------------------------------------------- reference, one at a time
    if not a.skip_ref:
        t0, c0 = time.perf_counter(), time.process_time()
        for p, o in zip(prompts[:ref_n], outs[:ref_n]):
            generate(model, [p], o)
        t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
        results.append([f"lmstack reference generate, 1 at a time ({ref_n} req)", t_ref, sum(outs[:ref_n]) / t_ref,
                        c_ref * n / ref_n])

    hf_tps = next((r[2] for r in results if r[0].startswith("HF")), None)
    hf_cpu = next((r[3] for r in results if r[0].startswith("HF")), None)
    rows = [[name, f"{t:.1f}", f"{tps:.1f}", f"{tps / hf_tps:.2f}x" if hf_tps else "-", f"{cpu:.1f}",
             f"{hf_cpu / cpu:.2f}x" if hf_cpu else "-"] for name, t, tps, cpu in results]
    print()
    print(table(rows, ["system", "time (s)", "output tok/s", "vs HF", "CPU s (all requests)", "HF CPU s / CPU s"]))
    print("(CPU s = process CPU time, less sensitive than wall time to other load on the machine; "
          "for the reference it is scaled to all requests)")
    print()
    print(f"engine: {flops / t_engine / 1e9:.1f} GFLOP/s achieved = {flops / t_engine / peak:.1%} of the measured "
          f"{str(dtype).replace('torch.', '')} matmul peak ({peak / 1e9:.1f} GFLOP/s, 1024x896 @ 896x4864)")
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"KV memory: paged {mean(live_frac):.1%} of allocated slots hold live tokens "
          f"(waste {1 - mean(live_frac):.1%}); contiguous prompt+max_tokens per request would be "
          f"{mean(contig_frac):.1%} (waste {1 - mean(contig_frac):.1%}), a padded batch of max prompt + max output "
          f"per row {mean(padded_frac):.1%} (waste {1 - mean(padded_frac):.1%}); preemptions {st.num_preemptions}")


if __name__ == "__main__":
    main()
