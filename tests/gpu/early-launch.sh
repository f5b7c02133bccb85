#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/early-launch.sh [check|bench|all]
# check: every kernel against flint-cpu (each kernel's entry changed), and the models with early
#        launch against every kernel waiting first (bit-equal logits), the CPU emulation and
#        each other (fused FP8 quantization, batched decode).
# bench: PRESET (default llama-3.1-8b) BF16 then FP8, the decode rows under each launch tuning of
#        TUNINGS (default 0,off,4,8,16,32: early launch without L2 prefetch, every kernel waiting
#        first, early launch with 4 to 32 MiB of L2 prefetch by each GEMV that follows a
#        latency-bound kernel), one process; and the step's projections alone in one graph.
# Logs and JSON go to $OUT (or ./gpu-out).
source tests/gpu/lib.sh
MODE=${1:-all}
PRESET=${PRESET:-llama-3.1-8b}
export FLINT_REQUIRE_GPU=1
banner
if [[ $MODE == bench || $MODE == all ]]; then
  echo "== bench $PRESET BF16 and FP8 under launch tunings ${TUNINGS:-0,off,4,8,16,32}"
  timeout 420 $B/flint bench --preset "$PRESET" --dtype fp8 --batches ${BATCHES:-1,8} --lengths ${LENGTHS:-128:128} \
    --launch-tuning ${TUNINGS:-0,off,4,8,16,32} --json-out "$OUT/flint-$PRESET-early-launch.json" 2>&1 | grep -v "^  " || status=1
fi
if [[ $MODE == check || $MODE == all ]]; then
  echo "== kernels against flint-cpu"
  timeout 240 $B/tests/kernels --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|test result" "$OUT/kernels.log" | tail -40
  echo "== transformers checkpoints, model tests"
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf timeout 300 $B/tests/gpu early_launch fused_fp8 fp8_model batched_decode matches \
    --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|worst|early launch|fused|panicked|test result" "$OUT/model.log" | tail -24
fi
exit $status
