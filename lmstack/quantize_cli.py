"""`lmstack quantize` and `lmstack export gguf`: argument parsing and printing only; the work is in
lmstack.model.quant / lmstack.model.awq / lmstack.gguf_io."""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="weight-only quantization (int8 | int4 | awq | nf4) into an HF folder")
    p.add_argument("--model", required=True, help="HF model folder (llama / qwen2 / qwen3 / mistral)")
    p.add_argument("--method", required=True, choices=["int8", "int4", "awq", "nf4"])
    p.add_argument("--out", required=True, help="output folder (config.json with quantization_config)")
    p.add_argument("--group-size", type=int, default=128, help="int4 / awq group size along in_features")
    p.add_argument("--calib", default=None, help="AWQ calibration text file (default: built-in arithmetic corpus)")
    p.add_argument("--calib-samples", type=int, default=32, help="AWQ: number of calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=512, help="AWQ: tokens per calibration sequence")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="module names left in float (default: lm_head)")
    p.set_defaults(func=run)


def add_export_gguf_arguments(p: argparse.ArgumentParser) -> None:
    """For the `export` verb's owner: the flags of `lmstack export gguf`."""
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="GGUF tensor type for 2-D weights (export gguf)")


def _calib_text(path: str | None) -> str:
    if path is not None:
        f = Path(path)
        if not f.is_file():
            raise FileNotFoundError(f"--calib {path}: no such file")
        return f.read_text(encoding="utf-8")
    from lmstack.tasks.arith import pretrain_corpus

    return "\n".join(pretrain_corpus(2000, seed=1234))


def run(args: argparse.Namespace) -> int:
    import torch

    from lmstack.model.loading import load_model, resolve_dtype
    from lmstack.model.quant import model_nbytes, quantize_model, save_quantized
    from lmstack.config import ModelConfig

    src, out = Path(args.model), Path(args.out)
    cfg = ModelConfig.from_hf(src)
    t0 = time.time()
    model = load_model(src, dtype=torch.float32)  # quantize from fp32: no double rounding
    before = model_nbytes(model)
    if args.method == "awq":
        from lmstack.model.awq import awq_quantize, calibration_batches
        from lmstack.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(src).encode(_calib_text(args.calib), add_special_tokens=False)
        calib = calibration_batches(ids, args.calib_samples, args.calib_seq_len)
        print(f"awq: calibrating on {calib.shape[0]} x {calib.shape[1]} tokens")
        awq_quantize(model, calib, args.group_size, tuple(args.skip))
    else:
        quantize_model(model, args.method, args.group_size, tuple(args.skip))
    float_dtype = resolve_dtype("auto", cfg)
    save_quantized(model, out, tuple(args.skip), float_dtype=float_dtype)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    size_src = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    size_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"quantized {src} with {args.method} in {time.time() - t0:.1f}s -> {out}")
    print(f"  weights on disk: {size_src / 2**20:.1f} MiB -> {size_out / 2**20:.1f} MiB; "
          f"in memory (fp32 build): {before / 2**20:.1f} MiB -> {model_nbytes(model) / 2**20:.1f} MiB")
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    """`lmstack export gguf --model DIR --out FILE.gguf --type T`."""
    from lmstack.gguf_io import export_gguf

    t0 = time.time()
    f = export_gguf(args.model, args.out, getattr(args, "type", "f16") or "f16")
    print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB, {args.type}) in {time.time() - t0:.1f}s")
    return 0
