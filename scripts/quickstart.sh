#!/usr/bin/env bash
# The main job: installs lmstack into ./.venv, then runs the whole pipeline on the built-in task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmstack quickstart "$@"
