#!/usr/bin/env bash
# The test command: installs lmstack + test references into ./.venv, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest tests "$@"
