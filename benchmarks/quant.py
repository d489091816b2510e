"""Weight-only quantization side by side: size on disk, weight memory, perplexity on held-out text and
single-stream decode tok/s for bf16 (float baseline), int8, int4 RTN, AWQ and NF4.

    python benchmarks/quant.py --model runs/quickstart/sft_cot      # a trained lmstack / HF folder

A trained model is what makes the perplexity columns meaningful (AWQ's advantage comes from the
activation outliers trained models have); with random weights the table only checks the plumbing.
Text: --text FILE, else the built-in arithmetic corpus (first 80% calibration, last 20% held out).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._engine_common import pick_dtype, table  # noqa: E402
from lmstack.generate import generate  # noqa: E402
from lmstack.model.loading import load_model, save_model  # noqa: E402
from lmstack.model.quant import model_nbytes, quantize_model, save_quantized  # noqa: E402


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, dtype: torch.dtype) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, seq_len):
        chunk = torch.tensor(ids[i: i + seq_len + 1])
        if len(chunk) < 2:
            break
        x, y = chunk[:-1][None], chunk[1:]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model.compute_logits(model(x, torch.arange(x.shape[1])[None]))[0].float()
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return math.exp(nll / n)


def decode_tps(model, prompt: list[int], n_new: int) -> float:
    generate(model, [prompt], 4)  # warm-up
    t = time.perf_counter()
    generate(model, [prompt], n_new)
    return n_new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder with tokenizer (e.g. a quickstart SFT output)")
    ap.add_argument("--text", default=None, help="text file for calibration + held-out perplexity")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-eval-tokens", type=int, default=20000)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 if the CPU has native bf16) | "
                                                    "bfloat16 | float32")
    ap.add_argument("--methods", default="float,int8,int4,awq,nf4")
    args = ap.parse_args()

    from lmstack.model.awq import awq_quantize, calibration_batches
    from lmstack.tokenizer import Tokenizer

    torch.manual_seed(0)
    src = Path(args.model)
    tok = Tokenizer.from_dir(src)
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        from lmstack.tasks.arith import pretrain_corpus

        text = "\n".join(pretrain_corpus(3000, seed=4321))
    ids = tok.encode(text, add_special_tokens=False)
    cut = int(len(ids) * 0.8)
    calib_ids, eval_ids = ids[:cut], ids[cut:][: args.max_eval_tokens]
    dt = pick_dtype(args.dtype)
    gs = args.group_size
    rows = []
    base_ppl = None
    for method in args.methods.split(","):
        model = load_model(src, dtype=torch.float32)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if method == "float":
                model = model.to(dt)
                save_model(model, tmp, dtype=torch.bfloat16)
                name = "bf16" if dt == torch.bfloat16 else "bf16 on disk / fp32 compute"
            else:
                if method == "awq":
                    awq_quantize(model, calibration_batches(calib_ids, args.calib_samples, args.seq_len), gs)
                else:
                    quantize_model(model, method, gs)
                save_quantized(model, tmp, float_dtype=torch.bfloat16)
                # float parts (embeddings, norms, lm_head) in the activation dtype, like the baseline
                for m in model.modules():
                    if not hasattr(m, "dequantize"):
                        m._apply(lambda t: t.to(dt) if t.is_floating_point() else t, recurse=False)
                name = {"int4": "int4 RTN"}.get(method, method)
            qtime = time.perf_counter() - t0
            disk = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        mem = model_nbytes(model)
        ppl = perplexity(model, eval_ids, args.seq_len, dt)
        base_ppl = ppl if method == "float" else base_ppl
        tps = decode_tps(model, eval_ids[:16], args.decode_tokens)
        inc = "" if base_ppl is None or method == "float" else f"{100 * (ppl / base_ppl - 1):+.2f}%"
        rows.append([name, f"{disk / 2**20:.1f}", f"{mem / 2**20:.1f}", f"{ppl:.3f}", inc, f"{tps:.1f}",
                     f"{qtime:.1f}"])
        print(f"done: {name}", file=sys.stderr)
    print(f"model {src}  activations {dt}  group {gs}  eval {len(eval_ids)} tokens  threads {torch.get_num_threads()}")
    print(table(rows, ["weights", "disk MiB", "memory MiB", "ppl", "ppl vs float", "decode tok/s", "quantize s"]))


if __name__ == "__main__":
    main()
