"""Command-line front end of training: `lmstack train`, `lmstack plot`, `lmstack export`.

`add_parser(subparsers)` registers the three verbs; `run(args)` executes whichever was chosen.
This is the only training module that prints (results to stdout; diagnostics go to the logger).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from lmstack.config import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model: lmstack train <stage> CONFIG.yaml [section.key=value ...]",
        description="Run a training stage (pretrain, sft, and the alignment stages) from a YAML config. "
                    "Any config key can be overridden as section.key=value, e.g. optim.lr=1e-4 training.max_steps=100.")
    p.add_argument("stage", help="training stage, e.g. pretrain | sft | rm | dpo | kto | orpo | simpo | ppo | grpo")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(train_cmd="train", func=run)

    p = subparsers.add_parser("plot", help="draw loss / metric curves (PNG) of a training run directory")
    p.add_argument("run_dir")
    p.set_defaults(train_cmd="plot", func=run)

    p = subparsers.add_parser("export", help="merge a LoRA/QLoRA adapter into its base model (HF folder), "
                              "`export gguf` for llama.cpp, or `export hf` to turn a .gguf file into an HF folder")
    p.add_argument("format", nargs="?", choices=["gguf", "hf"],
                   help="`gguf`: write a GGUF file instead of merging; `hf`: convert a .gguf file to an HF folder")
    p.add_argument("--model", required=True, help="base model: HF folder or .gguf file (the adapter's base, or the "
                   "model to convert)")
    p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder for the merged checkpoint, or FILE.gguf")
    from lmstack.quantize_cli import add_export_gguf_arguments

    add_export_gguf_arguments(p)
    p.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None,
                   help="the adapter was trained on an NF4 base (default: read from the adapter folder)")
    p.set_defaults(train_cmd="export", func=run)


def gguf_base_as_folder(cfg):
    """model.path may be a .gguf file: training starts from it as an HF folder written once into the run
    directory (at the file's precision; resuming reuses it), which the saved adapter names as its base."""
    from lmstack.checkpoint.resolve import hf_folder, is_gguf

    if cfg.model.path is None or not is_gguf(cfg.model.path):
        return cfg
    base = Path(cfg.training.out_dir) / "base_model"
    if not (base / "config.json").is_file():
        print(f"converting {cfg.model.path} to an HF folder: {base}")
        hf_folder(cfg.model.path, base)
    model = replace(cfg.model, path=str(base),
                    tokenizer=str(base) if cfg.model.tokenizer in (None, cfg.model.path) else cfg.model.tokenizer)
    return replace(cfg, model=model)


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "train_cmd", None)
    if cmd == "train":
        from lmstack.train.algos import get_stage
        from lmstack.train.config import load_config
        from lmstack.train.loop import train

        get_stage(args.stage)  # unknown stage -> error before reading data
        cfg = gguf_base_as_folder(load_config(args.config, args.overrides, stage=args.stage))
        res = train(args.stage, cfg)
        last = next((r for r in reversed(res.metrics) if "loss" in r), None)
        ev = next((r for r in reversed(res.metrics) if "eval_loss" in r), None)
        status = "interrupted (checkpoint saved; run the same command to resume)" if res.interrupted else "done"
        print(f"{args.stage}: {status} at step {res.step}"
              + (f", loss {last['loss']:.4f}" if last else "") + (f", eval_loss {ev['eval_loss']:.4f}" if ev else ""))
        print(f"run directory: {res.run_dir}")
        if res.final_dir is not None:
            print(f"final {'adapter' if cfg.lora is not None else 'model'}: {res.final_dir}")
        return 130 if res.interrupted else 0
    if cmd == "plot":
        from lmstack.train.metrics import plot_run

        paths = plot_run(args.run_dir)
        if not paths:
            print("nothing plotted (matplotlib missing or no metrics)")
        for p in paths:
            print(p)
        return 0
    if cmd == "export" and args.format in ("gguf", "hf"):
        from lmstack.quantize_cli import run_export_gguf, run_export_hf

        return (run_export_gguf if args.format == "gguf" else run_export_hf)(args)
    if cmd == "export":
        from lmstack.train.export import export_merged

        if not args.adapter:
            raise ConfigError("lmstack export: --adapter is required to merge (or use `lmstack export gguf` / "
                              "`lmstack export hf`)")

        out = export_merged(args.model, args.adapter, args.out, qlora=args.qlora)
        print(f"merged model written to {out}")
        return 0
    raise ConfigError(f"cli_train.run: unknown command {cmd!r}")
