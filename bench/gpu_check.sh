#!/usr/bin/env bash
# One command on a fresh CUDA machine: install lmcraft, run the parity and device tests, the generation and training
# benchmarks on the GPU, and print one summary table (the benchmarks' own tables come above it).
#
#   bash bench/gpu_check.sh            # from the repository root; PYTHON=python3.12 to choose the interpreter
#   SKIP_INSTALL=1 bash bench/gpu_check.sh   # an offline machine whose Python already has the dependencies: no pip;
#                                            # lmcraft is then imported from src/ when it is not installed
#
# torch: the one already installed is kept when it sees a GPU; otherwise the CUDA wheel is installed first
# (TORCH_INDEX, default the cu126 index of download.pytorch.org). Measured on an H200 (2026-12-04, offline, cold
# compile cache): tests 43 s, generation 184 s, training ~300 s (full and LoRA tables, each with a ~60 s compile),
# so about 9 minutes; each step stops at its limit below. Where SmolLM2-135M cannot be fetched, its rows use random
# weights of its shape (speed does not depend on the values). Logs: $OUT (default /tmp/lmcraft-gpu-check).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/lmcraft-gpu-check}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}
mkdir -p "$OUT"
declare -a ROWS=()

step() {  # step NAME LOG SECONDS COMMAND...: run (stopped after SECONDS), time, record
          # "| NAME | ok/FAILED (rc)/TIMED OUT | seconds | last summary line |"
  local name=$1 log=$2 limit=$3; shift 3
  local start=$SECONDS
  echo "=== $name (at most ${limit} s)" >&2
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (rc $rc)"
  [ "$rc" -eq 124 ] && status="FAILED (timed out after ${limit} s)"
  local summary
  summary=$(grep -E "passed|failed|^ratio:|error" "$OUT/$log" | tail -n 1 | cut -c1-150)
  ROWS+=("| $name | $status | $((SECONDS - start)) | ${summary:-see $OUT/$log} |")
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ -z "${SKIP_INSTALL:-}" ]; then
    step "install torch (CUDA wheel)" install-torch.log 600 "$PY" -m pip install -q torch --index-url "$TORCH_INDEX"
  fi
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
  step "install lmcraft[dev,bench]" install.log 300 "$PY" -m pip install -q -e '.[dev,bench]'
fi
if [ -n "${SKIP_INSTALL:-}" ] && ! "$PY" -c "import lmcraft" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')" | tee "$OUT/device.log"

step "device + parity tests" tests.log 120 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_devices.py tests/test_generate_static.py tests/test_generate_parity.py tests/test_precision.py
step "generation bench (cuda)" generate.log 240 "$PY" -m bench.bench_generate --device cuda --precisions auto \
  --compile --new-tokens 64 --repeats 3
step "training bench (cuda)" train.log 360 "$PY" -m bench.bench_train --device cuda --precisions fp32 bf16 \
  --model smollm2-135m --batch 16 --seq-len 512 --repeats 3 --matmul-size 8192

echo
echo "| check | status | seconds | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
grep -q FAILED <<<"${ROWS[*]}" && exit 1
exit 0
