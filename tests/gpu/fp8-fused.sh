#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/fp8-fused.sh [check|bench|all]
# check: the FP8 GEMV that quantizes its bf16 input against quantize_rows + the GEMV (bit for
#        bit), the published amax of the attention and SwiGLU kernels, and the FP8 model with
#        fused quantization against the separate kernels (bit-equal logits) and the CPU emulation.
# bench: PRESET (default llama-3.1-8b) BF16, then FP8 fused, then FP8 with separate quantization
#        kernels, one after the other in one process (flint bench --fp8-quantization both).
# Logs and JSON go to $OUT (or ./gpu-out).
source tests/gpu/lib.sh
MODE=${1:-all}
PRESET=${PRESET:-llama-3.1-8b}
export FLINT_REQUIRE_GPU=1
banner
if [[ $MODE == check || $MODE == all ]]; then
  echo "== FP8 and attention kernels against flint-cpu and each other"
  timeout 240 $B/tests/kernels fp8 attention --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|test result" "$OUT/kernels.log" | tail -8
  echo "== transformers checkpoints, FP8 model tests"
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf timeout 300 $B/tests/gpu fused_fp8 fp8_model batched_decode --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|worst|fused|panicked|test result" "$OUT/model.log" | tail -16
fi
if [[ $MODE == bench || $MODE == all ]]; then
  echo "== bench $PRESET BF16, FP8 fused, FP8 separate"
  timeout 400 $B/flint bench --preset "$PRESET" --dtype fp8 --fp8-quantization both --batches ${BATCHES:-1,2,8} \
    --lengths ${LENGTHS:-128:128} --json-out "$OUT/flint-$PRESET-fp8-fused.json" 2>&1 | grep -v "^  " || status=1
fi
exit $status
