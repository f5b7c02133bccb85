#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/run.sh [check|bench|all] [PRESET]
# check: every kernel against the CPU reference; transformers-built checkpoints against Flint.
# bench: cargo xtask bench for PRESET (default llama-3.1-8b), with transformers eager beside it.
# Logs and JSON go to $OUT (or ./gpu-out).
set -uo pipefail
MODE=${1:-all}
PRESET=${2:-llama-3.1-8b}
B=.gpu/bundle
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export FLINT_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
status=0
echo "revision $(cat $B/REVISION)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ $MODE == check || $MODE == all ]]; then
  echo "== kernels against flint-cpu"
  $B/tests/kernels --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test |rel err|panicked|test result" "$OUT/kernels.log" | grep -E "test |panicked|result" | tail -20
  grep -E "rel err" "$OUT/kernels.log" | sort -t' ' -k3 | awk '{print}' | sort -g -k4 -t' ' | tail -3
  echo "== transformers checkpoints"
  python3 tests/gpu/hf_models.py --out /tmp/flint-hf > "$OUT/hf_models.log" 2>&1 || status=1
  tail -4 "$OUT/hf_models.log"
  FLINT_HF_MODELS=/tmp/flint-hf $B/tests/model --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test |worst|matches|panicked|test result" "$OUT/model.log" | tail -20
fi
if [[ $MODE == bench || $MODE == all ]]; then
  echo "== bench $PRESET"
  $B/xtask bench --preset "$PRESET" --out "$OUT" --flint $B/flint || status=1
fi
exit $status
