"""`lmstack bench NAME [ARGS...]`: run one of the repository's benchmark scripts (benchmarks/NAME.py).

Benchmarks print side-by-side tables against the reference systems; they live beside the package
(not inside it) because they import the references (transformers, llama-cpp-python) the library
itself never needs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_")) if BENCH_DIR.is_dir() else []


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script (benchmarks/NAME.py): " + ", ".join(available()))
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --quick)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; available: {names} (in {BENCH_DIR})")
    return subprocess.call([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.args], cwd=BENCH_DIR)
