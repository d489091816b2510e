"""`lmstack quantize`, `lmstack export gguf` and `lmstack export hf`: argument parsing and printing
only; the work is in lmstack.model.quant / lmstack.model.awq / lmstack.checkpoint.gguf."""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
_KERNEL_GROUPS = (128, 64, 32)  # group sizes the int4 CPU kernel takes, preferred first (AutoAWQ / GPTQ: 128)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="weight-only quantization (int8 | int4 | awq | nf4) into an HF folder")
    p.add_argument("--model", required=True, help="HF model folder or .gguf file (llama / qwen2 / qwen3 / mistral)")
    p.add_argument("--method", required=True, choices=["int8", "int4", "awq", "nf4"])
    p.add_argument("--out", required=True, help="output folder (config.json with quantization_config)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 / awq group size along in_features (default: 128, or the largest of 64, 32 that "
                        "divides every layer's in_features)")
    p.add_argument("--calib", default=None, help="AWQ calibration text file (default: built-in arithmetic corpus)")
    p.add_argument("--calib-samples", type=int, default=32, help="AWQ: number of calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=512, help="AWQ: tokens per calibration sequence")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="module names left in float (default: lm_head)")
    p.set_defaults(func=run)


def add_export_gguf_arguments(p: argparse.ArgumentParser) -> None:
    """For the `export` verb's owner: the flags of `lmstack export gguf` / `lmstack export hf`."""
    from lmstack.checkpoint.gguf.quants import EXPORT_TYPES

    p.add_argument("--type", default="f16", choices=list(EXPORT_TYPES),
                   help="export gguf: file type; quantized types give each tensor the type llama-quantize "
                        "would (q4_k is llama.cpp's Q4_K_M)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="export hf: weight dtype (default: the GGUF file's own precision)")


def _calib_text(path: str | None) -> str:
    if path is not None:
        f = Path(path)
        if not f.is_file():
            raise FileNotFoundError(f"--calib {path}: no such file")
        return f.read_text(encoding="utf-8")
    from lmstack.tasks.arith import pretrain_corpus

    return "\n".join(pretrain_corpus(2000, seed=1234))


def pick_group_size(in_features: dict[str, int], requested: int | None) -> tuple[int, str | None]:
    """(group size, why it is not the default) for int4: the requested one as is, else 128, or the
    largest of 64 / 32 that divides every layer's in_features (then the largest divisor <= 128 of
    their gcd, which the int4 kernel does not take: such layers run as plain nibbles)."""
    if requested is not None:
        return requested, None
    g = math.gcd(*in_features.values()) if in_features else 128
    pick = next((c for c in _KERNEL_GROUPS if g % c == 0), None) or max(d for d in range(1, 129) if g % d == 0)
    if pick == 128:
        return pick, None
    name, k = next((n, k) for n, k in in_features.items() if k % 128)
    return pick, f"128 does not divide in_features {k} of {name}"


def run(args: argparse.Namespace) -> int:
    import torch

    from lmstack.checkpoint.resolve import hf_folder
    from lmstack.model.loading import load_model, resolve_dtype
    from lmstack.model.quant import model_nbytes, quantizable_linears, quantize_model, save_quantized

    out = Path(args.out)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lmstack-quantize-") as work:
        src = hf_folder(args.model, work)  # a .gguf file becomes a folder at its own precision
        model = load_model(src, dtype=torch.float32)  # quantize from fp32: no double rounding
        float_dtype = resolve_dtype("auto", model.config)  # the non-quantized tensors keep the source's dtype
        before = model_nbytes(model)
        group = args.group_size
        if args.method in ("int4", "awq"):
            names = quantizable_linears(model, tuple(args.skip))
            group, why = pick_group_size({n: model.get_submodule(n).in_features for n in names}, args.group_size)
            print(f"{args.method}: group size {group}" + (f" ({why})" if why else ""))
        if args.method == "awq":
            from lmstack.model.awq import awq_quantize, calibration_batches
            from lmstack.tokenizer import Tokenizer

            ids = Tokenizer.from_dir(src).encode(_calib_text(args.calib), add_special_tokens=False)
            calib = calibration_batches(ids, args.calib_samples, args.calib_seq_len)
            print(f"awq: calibrating on {calib.shape[0]} x {calib.shape[1]} tokens")
            awq_quantize(model, calib, group, tuple(args.skip))
        else:
            quantize_model(model, args.method, group or 128, tuple(args.skip))
        save_quantized(model, out, tuple(args.skip), float_dtype=float_dtype)
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
    size_src = Path(args.model).stat().st_size if Path(args.model).is_file() else \
        sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    size_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"quantized {args.model} with {args.method} in {time.time() - t0:.1f}s -> {out}")
    print(f"  weights on disk: {size_src / 2**20:.1f} MiB -> {size_out / 2**20:.1f} MiB; "
          f"in memory (fp32 build): {before / 2**20:.1f} MiB -> {model_nbytes(model) / 2**20:.1f} MiB")
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    """`lmstack export gguf --model DIR|X.gguf --out FILE.gguf --type T`."""
    from lmstack.checkpoint.gguf.export import export_gguf

    t0 = time.time()
    f = export_gguf(args.model, args.out, args.type)
    print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB, {args.type}) in {time.time() - t0:.1f}s")
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    """`lmstack export hf --model X.gguf --out DIR [--dtype D]`: an HF folder transformers loads."""
    import torch

    from lmstack.checkpoint.gguf.load import gguf_to_hf, source_dtype
    from lmstack.checkpoint.resolve import is_gguf
    from lmstack.config import ConfigError

    if not is_gguf(args.model):
        raise ConfigError(f"lmstack export hf: --model {args.model} must be a .gguf file (it converts GGUF to an HF "
                          "folder)")
    t0 = time.time()
    dt = getattr(torch, args.dtype) if args.dtype else source_dtype(args.model)
    out = gguf_to_hf(args.model, args.out, dt)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    why = "as requested" if args.dtype else "the GGUF file's precision"
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {str(dt).removeprefix('torch.')}: {why}) in {time.time() - t0:.1f}s")
    return 0
