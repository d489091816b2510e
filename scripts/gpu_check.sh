#!/usr/bin/env bash
# The one prepared GPU check (issue 19, item 6). Run from anywhere on a CUDA machine:
#
#     bash scripts/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# It needs only what the GPU machine carries: a CUDA build of PyTorch (>= 2.5) with the Triton it
# bundles, and pytest (pytest-xdist optional). Nothing is installed or downloaded. Stages, each with
# its own time limit so the whole run stays under 8 minutes:
#   0. preflight (seconds): stops at once, loudly, without a CUDA GPU, Triton or pytest;
#   1. the GPU test subset (<= 240 s): tests/test_cuda_kernels.py compiled for the GPU (no
#      interpreter), in fp32 / fp16 / bf16;
#   2. per-kernel benchmark (<= 150 s): benchmarks/cuda_kernels.py, Triton vs the PyTorch reference /
#      SDPA / cuBLAS at Qwen2.5-0.5B's shapes (14 / 2 heads, head_dim 64, 16-token blocks, 64
#      sequences of 512 context), one table;
#   3. engine and training benchmarks (<= 60 s here; placeholder, see the contract below).
# Logs go to $GPU_CHECK_OUT (default /tmp/gpu_check). Exit status: 0 when every stage that ran
# passed, 1 when a stage failed (later stages still run, so one run gives every table), 2 when the
# machine cannot run the check at all.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT_DIR="${GPU_CHECK_OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lmstack, uninstalled
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/tx_gpu_check}"
unset TRITON_INTERPRET LMSTACK_TRITON  # compiled kernels, never the interpreter or the references
START=$(date +%s)
STATUS=0
declare -a SUMMARY=()

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT_DIR/NAME.log, record the result
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== gpu_check: $name (limit ${limit}s) ==="
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("$name: ok (${took}s)")
  else
    [ "$rc" -eq 124 ] && SUMMARY+=("$name: TIMED OUT after ${limit}s") || SUMMARY+=("$name: FAILED (exit $rc, ${took}s)")
    STATUS=1
  fi
}

# --- 0. preflight --------------------------------------------------------------------------------
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu_check: FATAL: PyTorch is not importable ({e})")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: FATAL: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
             "CUDA_VISIBLE_DEVICES or the driver?): this script only runs on a GPU machine")
try:
    import triton
except ImportError as e:
    sys.exit(f"gpu_check: FATAL: Triton is not importable ({e}); it ships with PyTorch's CUDA wheels")
try:
    import pytest
except ImportError as e:
    sys.exit(f"gpu_check: FATAL: pytest is not importable ({e})")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability "
      f"{p.major}.{p.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"pytest {pytest.__version__}, python {sys.version.split()[0]}")
EOF
then
  echo "gpu_check: cannot run here (see the line above)" >&2
  exit 2
fi
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)  # parallel workers compile kernels in parallel

# --- 1. GPU test subset --------------------------------------------------------------------------
stage tests 240 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/test_cuda_kernels.py

# --- 2. per-kernel benchmark ---------------------------------------------------------------------
stage kernels 150 "$PY" benchmarks/cuda_kernels.py

# --- 3. engine and training benchmarks (placeholder) ---------------------------------------------
# Contract for benchmarks/gpu_engine.py, which the GPU engine integration adds (issue 19 items 1-4):
#   - invocation: `$PY benchmarks/gpu_engine.py --budget-s 60 --out DIR`, from the checkout's root,
#     with this checkout's lmstack on PYTHONPATH and only the machine's packages (HF transformers and
#     peft are there; nothing downloaded: random weights on the Qwen2.5-0.5B config shape the
#     benchmarks already carry);
#   - it finishes inside --budget-s seconds (the whole script must stay under 8 minutes) and exits
#     non-zero on any failure;
#   - it prints one markdown table, `| metric | lmstack | reference | ratio |`, with rows for: engine
#     throughput on benchmarks/throughput.py's 64-request workload vs HF `generate` on the same GPU
#     (target >= 5x); single-stream decode tokens/s with CUDA graphs and its share of the HBM-bandwidth
#     roofline (weight + KV bytes per token / measured copy bandwidth; target >= 60%); SFT tokens/s
#     and peak memory for full / LoRA / QLoRA (target: QLoRA peak <= 0.5x LoRA's);
#   - it may write its raw numbers as JSON into --out.
if [ -f benchmarks/gpu_engine.py ]; then
  stage engine 60 "$PY" benchmarks/gpu_engine.py --budget-s 55 --out "$OUT_DIR"
else
  echo
  echo "=== gpu_check: engine: skipped (benchmarks/gpu_engine.py does not exist yet; see the contract above) ==="
  SUMMARY+=("engine: skipped (not written yet)")
fi

echo
echo "=== gpu_check summary ($(( $(date +%s) - START ))s in all; logs in $OUT_DIR) ==="
for line in "${SUMMARY[@]}"; do echo "  $line"; done
exit $STATUS
