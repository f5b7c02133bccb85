#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/decode-fusion.sh [kernels|models|check|bench|all]   (check = kernels + models)
# check: every kernel against flint-cpu (with the decode attention that ropes and writes the new
#        K/V itself against rope_kv_write + the plain kernel, and the FP8 GEMV with the norm tail
#        against the GEMV + add_rms_norm_fp8, bit for bit), then the models: the fused RoPE
#        attention and the norm tail against the separate kernels (bit-equal logits on every
#        reference checkpoint), early launch, fused FP8 quantization, the CPU emulation, batched
#        decode and transformers' logits.
# bench: PRESET (default llama-3.1-8b) BF16 then FP8 (FP8 cache), with the RoPE folded into the
#        decode attention and the FP8 norm tail, then each model again with the separate RoPE
#        kernel, and the FP8 one with the norm kernels, one process.
# Logs and JSON go to $OUT (or ./gpu-out). KERNEL_TESTS / MODEL_TESTS narrow the tests run (test
# name filters); KERNELS_TIMEOUT, HF_TIMEOUT, MODELS_TIMEOUT and BENCH_TIMEOUT bound each part.
source tests/gpu/lib.sh
MODE=${1:-all}
PRESET=${PRESET:-llama-3.1-8b}
export FLINT_REQUIRE_GPU=1
banner
if [[ $MODE == kernels || $MODE == check || $MODE == all ]]; then
  echo "== kernels against flint-cpu"
  timeout ${KERNELS_TIMEOUT:-240} $B/tests/kernels ${KERNEL_TESTS:-} --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|test result" "$OUT/kernels.log" | tail -40
fi
if [[ $MODE == models || $MODE == check || $MODE == all ]]; then
  echo "== transformers checkpoints, model tests"
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf timeout ${MODELS_TIMEOUT:-420} $B/tests/gpu ${MODEL_TESTS:-fused_rope norm_tail early_launch fused_fp8 fp8_model batched_decode matches} \
    --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|worst|early launch|fused|bit-equal|panicked|test result" "$OUT/model.log" | tail -24
fi
if [[ $MODE == bench || $MODE == all ]]; then
  echo "== bench $PRESET BF16 and FP8, RoPE in the attention and separate, FP8 norm tail and separate"
  timeout ${BENCH_TIMEOUT:-420} $B/flint bench --preset "$PRESET" --dtype fp8 --batches ${BATCHES:-1,8} --lengths ${LENGTHS:-128:128} \
    --rope-attention both --norm-tail both --json-out "$OUT/flint-$PRESET-decode-fusion.json" 2>&1 | grep -v "^  " || status=1
fi
exit $status
