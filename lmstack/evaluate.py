"""Evaluation: exact-match accuracy on the arithmetic task, perplexity / bits-per-byte on a text file.

`lmstack eval --model DIR|X.gguf --task arith [--n 200] [--digits 2,3]`
`lmstack eval --model DIR|X.gguf --task ppl --data FILE [--max-len 512]`
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmstack.log import logger


@dataclass
class ArithResult:
    accuracy: float
    n: int
    correct: int
    format_ok: float  # fraction of completions that ended in a parsable answer line
    mean_tokens: float
    samples: list[dict] = field(default_factory=list)
    per_problem: list[bool] = field(default_factory=list)  # correct or not, in test-set order (paired comparisons)


def arith_accuracy(model_or_llm, tokenizer=None, n: int = 200, seed: int = 1234, digits: tuple[int, int] = (2, 3),
                   max_tokens: int = 160, engine_args: dict | None = None,
                   ops: tuple[str, ...] = ("+", "-", "*")) -> ArithResult:
    """Greedy answers to `n` held-out problems, scored by the exact final answer.

    `model_or_llm` is an HF folder, an `LLM`, or a Transformer (with `tokenizer`). Generation runs
    through the lmstack engine (batched, paged KV); prompts go through the chat template.
    """
    from lmstack.engine.llm import LLM
    from lmstack.engine.sampling_params import SamplingParams
    from lmstack.tasks import arith

    if isinstance(model_or_llm, LLM):
        llm = model_or_llm
    elif isinstance(model_or_llm, (str, Path)):
        llm = LLM(str(model_or_llm), **(engine_args or {}))
    else:
        llm = LLM.from_model(model_or_llm, tokenizer, **(engine_args or {}))
    problems = arith.test_set(n, seed=seed, digits=digits, ops=ops)
    convs = [[{"role": "user", "content": p.question}] for p in problems]
    answers = [p.answer for p in problems]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    correct = fmt = toks = 0
    samples = []
    per_problem: list[bool] = []
    for conv, ans, out in zip(convs, answers, outs):
        text = out.outputs[0].text
        got = arith.extract_answer(text)
        per_problem.append(got == ans)
        correct += int(got == ans)
        fmt += int(got is not None)
        toks += len(out.outputs[0].token_ids)
        if len(samples) < 5:
            samples.append({"question": conv[0]["content"], "answer": ans, "completion": text})
    n = len(problems)
    return ArithResult(correct / n, n, correct, fmt / n, toks / n, samples, per_problem)


def paired_sign_test(before: list[bool], after: list[bool]) -> tuple[int, int, float]:
    """Two models on the same problems: (fixed, broken, two-sided exact sign-test p-value).

    Only discordant problems carry information (McNemar's exact test): under "no difference" each is
    fixed or broken with probability 1/2, so p = P(Binomial(fixed + broken, 1/2) at least as uneven)."""
    if len(before) != len(after):
        raise ValueError(f"paired test needs the same problems: {len(before)} vs {len(after)} results")
    fixed = sum(1 for b, a in zip(before, after) if a and not b)
    broken = sum(1 for b, a in zip(before, after) if b and not a)
    n, k = fixed + broken, min(fixed, broken)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return fixed, broken, p


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_len: int = 512) -> dict[str, float]:
    """Token-level perplexity and bits per byte (= total NLL in bits / UTF-8 bytes), so tokenizers of
    different granularity compare fairly. Documents are scored independently in windows of max_len."""
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        total_bytes += len(text.encode("utf-8"))
        for s in range(0, max(len(ids) - 1, 0), max_len):
            chunk = ids[s: s + max_len + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]], device=model.device)
            y = torch.tensor(chunk[1:], device=model.device)
            h = model(x, torch.arange(x.shape[1], device=model.device)[None])[0]
            logits = model.compute_logits(h).float()
            total_nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            total_tokens += len(y)
    if total_tokens == 0:
        raise ValueError("perplexity: the data has no document of at least 2 tokens")
    return {"ppl": math.exp(total_nll / total_tokens), "bits_per_byte": total_nll / math.log(2) / total_bytes,
            "tokens": total_tokens, "bytes": total_bytes}


def read_texts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "text" not in rec:
                    raise ValueError(f"{p}:{i}: missing column 'text'")
                out.append(rec["text"])
        return out
    return [t for t in p.read_text().split("\n\n") if t.strip()]


# --------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: --task arith (exact match) or --task ppl")
    p.add_argument("--model", required=True, help="HF model folder or .gguf file")
    p.add_argument("--task", choices=["arith", "ppl"], required=True)
    p.add_argument("--data", help="text / JSONL file for --task ppl")
    p.add_argument("--n", type=int, default=200, help="number of held-out problems (arith)")
    p.add_argument("--digits", default="2,3", help="operand digit range, e.g. 2,3 (arith)")
    p.add_argument("--ops", default="+-*", help="operations of the held-out problems (arith)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has native bf16, else fp32) | float32 | "
                   "bfloat16 | float16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.task == "arith":
        lo, hi = (int(x) for x in args.digits.split(","))
        res = arith_accuracy(args.model, n=args.n, digits=(lo, hi), engine_args={"dtype": args.dtype},
                             ops=tuple(args.ops))
        print(f"arith exact-match: {res.accuracy:.3f} ({res.correct}/{res.n}); answer format ok: {res.format_ok:.2f}; "
              f"mean completion tokens: {res.mean_tokens:.1f}")
        for s in res.samples[:3]:
            print(json.dumps(s, ensure_ascii=False))
        return 0
    if not args.data:
        raise ValueError("--task ppl needs --data FILE")
    from lmstack.checkpoint.resolve import load_for_inference

    model, tok = load_for_inference(args.model, args.dtype)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer.json; --task ppl needs the model's tokenizer")
    r = perplexity(model, tok, read_texts(args.data), args.max_len)
    logger.info("scored %d tokens", r["tokens"])
    print(f"perplexity: {r['ppl']:.3f}  bits/byte: {r['bits_per_byte']:.4f}  ({r['tokens']} tokens, {r['bytes']} bytes)")
    return 0
