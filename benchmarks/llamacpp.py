"""lmstack versus llama.cpp (llama-cpp-python) on the same weights, same machine, same run.

A random-weight model with Qwen2.5-0.5B's shape (../shared/bench_models/qwen2.5-0.5b/config.json)
is exported to GGUF (BF16, Q8_0, Q4_0) and run by llama-cpp-python; lmstack runs the same weights
as bf16 (or fp32 compute where the CPU lacks native bf16), int8 and int4 (every linear including the
LM head, as in the GGUF; int8: oneDNN's int8 x int8 product with activations quantized per row, as
llama.cpp's Q8_0 quantizes them per block; int4: aten's weight-only kernel with bf16 activations).
Two numbers per pair:
  - single-stream decode tok/s (one request, greedy, prompt excluded);
  - total tok/s for 16 concurrent requests (lmstack: continuous batching in one engine;
    llama-cpp-python's Llama serves one sequence at a time, so its 16 requests run back to back).
Targets (issue 7): single stream >= 0.8x llama.cpp at the same bit width; 16 requests >= 2x.

    python benchmarks/llamacpp.py [--layers N] [--new-tokens 32] [--prompt-len 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._engine_common import bench_config, pick_dtype, random_model, table  # noqa: E402
from lmstack.engine.llm import LLM  # noqa: E402
from lmstack.engine.sampling_params import SamplingParams  # noqa: E402
from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.model.loading import save_model  # noqa: E402
from lmstack.model.quant import quantize_model  # noqa: E402


def byte_tokenizer(out: Path) -> None:
    """A small byte-level BPE + <|endoftext|>: enough for a GGUF (llama.cpp needs merges); we feed ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 50, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))


def lmstack_run(model, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    llm = LLM(model, max_num_seqs=len(prompts), kv_cache_memory=512 << 20)
    p = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    # single stream: time to first token excluded (decode only)
    t0 = time.perf_counter()
    llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate([prompts[0]], p)
    single = (n_new - 1) / max(time.perf_counter() - t0 - prefill, 1e-9)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, p)
    total = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
    return single, total


def llamacpp_measure(path: Path, prompts: list[list[int]], n_new: int, threads: int,
                     extra_bufts: bool = True) -> tuple[float, float]:
    import llama_cpp.llama_cpp as llama_cpp  # the low-level module llama.py reads its defaults from
    import numpy as np
    from llama_cpp import Llama

    if not extra_bufts:  # no weight repacking into AMX / AVX-512 layouts (see llamacpp_run)
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
    llm = Llama(model_path=str(path), n_ctx=512, n_batch=256, n_threads=threads, logits_all=False, verbose=False)

    n_vocab = llm.n_vocab()

    def one(prompt: list[int]) -> float:
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            nxt = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
            llm.eval([nxt])
        return (n_new - 1) / (time.perf_counter() - t0)

    one(prompts[0][:8])  # warm-up
    single = one(prompts[0])
    t0 = time.perf_counter()
    for pr in prompts:
        one(pr)
    total = len(prompts) * (n_new - 1) / (time.perf_counter() - t0)
    return single, total


def llamacpp_run(path: Path, prompts: list[list[int]], n_new: int, threads: int) -> tuple[float, float, str]:
    """llamacpp_measure in a child process. On Sapphire-Rapids-class CPUs llama.cpp repacks quantized
    weights for its AMX kernels and can segfault there (ggml-org/llama.cpp#20824; seen here with
    Q8_0 in llama-cpp-python 0.3.36); then it is measured again with weight repacking off, and the
    row says so."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        for extra in (1, 0):
            cmd = [sys.executable, __file__, "--child", str(path), f.name, str(n_new), str(threads), str(extra)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is not None:
                single, total = json.loads(line[7:])
                return single, total, "" if extra else " (repacking off: llama.cpp crashed with it)"
            print(f"llama.cpp on {path.name} {'with' if extra else 'without'} weight repacking exited with "
                  f"{out.returncode}: {out.stderr.strip()[-300:]}", file=sys.stderr)
    finally:
        os.unlink(f.name)
    raise SystemExit(f"llama.cpp failed on {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # llamacpp_run's child process
        _, _, path, prompts_file, n_new, threads, extra = sys.argv
        res = llamacpp_measure(Path(path), json.loads(Path(prompts_file).read_text()), int(n_new), int(threads),
                               extra_bufts=extra == "1")
        print("RESULT " + json.dumps(res), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (default: the real 24)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--dtype", default="auto", help="lmstack float compute dtype: auto | bfloat16 | float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("needs llama-cpp-python: pip install llama-cpp-python") from None

    cfg = bench_config(args.layers)
    dt = pick_dtype(args.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        base = random_model(cfg, torch.float32)
        save_model(base, d, dtype=torch.bfloat16)
        byte_tokenizer(d)
        ggufs = {}
        for ty in ("bf16", "q8_0", "q4_0"):
            t0 = time.perf_counter()
            ggufs[ty] = export_gguf(d, Path(tmp) / f"m-{ty}.gguf", ty)
            print(f"exported {ty} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        pairs = [("16-bit", None, "bf16"), ("8-bit", "int8", "q8_0"), ("4-bit", "int4", "q4_0")]
        for label, method, ty in pairs:
            m = random_model(cfg, torch.float32)
            if method is not None:
                # the LM head too: the GGUF's tied token_embd/output matrix is Q8_0/Q4_0 as well
                quantize_model(m, method, 128, skip=())
            for mod in m.modules():  # float parts in the compute dtype
                if not hasattr(mod, "dequantize"):
                    mod._apply(lambda t: t.to(dt) if t.is_floating_point() else t, recurse=False)
            ours = lmstack_run(m, prompts, args.new_tokens)
            del m
            *theirs, how = llamacpp_run(ggufs[ty], prompts, args.new_tokens, args.threads)
            name = f"lmstack {method or str(dt).replace('torch.', '')} vs llama.cpp {ty.upper()}{how}"
            rows.append([label, name, f"{ours[0]:.1f}", f"{theirs[0]:.1f}", f"{ours[0] / theirs[0]:.2f}x",
                         f"{ours[1]:.1f}", f"{theirs[1]:.1f}", f"{ours[1] / theirs[1]:.2f}x"])
            print(f"done {label}", file=sys.stderr)
    print(f"Qwen2.5-0.5B shape ({cfg.num_layers} layers), random weights; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.requests} concurrent requests, {args.threads} threads")
    print(table(rows, ["bits", "pair", "lmstack 1-stream tok/s", "llama.cpp 1-stream tok/s", "ratio (>=0.8)",
                       f"lmstack {args.requests}-req tok/s", f"llama.cpp {args.requests}-req tok/s",
                       "ratio (>=2)"]))


if __name__ == "__main__":
    main()
