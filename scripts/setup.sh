#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs lmstack into it.
# usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.lmstack-installed-${1:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  if [ -n "${1:-}" ]; then
    .venv/bin/python -m pip install -q -e ".[$1]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi
