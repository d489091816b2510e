"""`lmstack <verb>`: the only place that parses arguments or prints (DESIGN.md).

Verbs that live with their subsystem expose `add_parser(subparsers)` and `run(args) -> int`;
this file wires them and turns expected errors into one clear line on stderr (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lmstack.log import logger, setup_logging

# verb -> module with add_parser/run (imported only when building the parser for that verb)
_MODULE_VERBS = {
    "tokenizer": "lmstack.tokenizer_train",
    "train": "lmstack.train.cli_train",
    "plot": "lmstack.train.cli_train",
    "export": "lmstack.train.cli_train",
    "quantize": "lmstack.quantize_cli",
    "serve": "lmstack.engine.server",
    "chat": "lmstack.chat_cli",
    "eval": "lmstack.evaluate",
    "quickstart": "lmstack.quickstart",
    "bench": "lmstack.bench",
}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("--model", required=True, help="HF model folder or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn via the chat template")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has native bf16, else fp32) | float32 | "
                   "bfloat16 | float16")
    p.add_argument("--attn", default="sdpa", choices=["naive", "sdpa", "tiled"])
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from lmstack.checkpoint.resolve import load_for_inference
    from lmstack.generate import generate_stream
    from lmstack.tokenizer import IncrementalDetokenizer

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_for_inference(args.model, args.dtype)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer.json; `lmstack generate` needs one to read the prompt")
    model.set_attention_impl(args.attn)
    if args.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                 add_generation_prompt=True), add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    eos = set(tok.eos_token_ids) | set(model.config.eos_token_ids)
    detok = IncrementalDetokenizer(tok)
    logger.info("prompt: %d tokens; generating up to %d", len(ids), args.max_tokens)
    for step in generate_stream(model, [ids], args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, eos_token_ids=eos):
        t = step[0]
        if t is None or t in eos:
            break
        sys.stdout.write(detok.add(t))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="lmstack: tokenizer -> pretrain -> SFT -> "
                                     "align -> quantize -> serve, in one small PyTorch codebase.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    _add_generate(sub)
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    # Only import the module of the verb being run (fast startup); `--help` imports all of them.
    wanted = [verb] if verb in _MODULE_VERBS else list(_MODULE_VERBS)
    done: set[str] = set()
    for v in wanted:
        mod_name = _MODULE_VERBS[v]
        if mod_name in done:
            continue
        done.add(mod_name)
        importlib.import_module(mod_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        rc = args.func(args) if hasattr(args, "func") else args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        if args.verbose:
            raise
        msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
        print(f"lmstack {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
