#!/usr/bin/env bash
# The test command: installs lmstack + test references into ./.venv, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# two workers for the two cores CI has; tests use one intra-op thread each (tests/conftest.py)
exec .venv/bin/python -m pytest -n "${LMSTACK_TEST_WORKERS:-2}" --durations=15 tests "$@"
