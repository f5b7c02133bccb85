#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/profile-step.sh
# Nsight Compute over one steady-state decode step of each model of a `flint bench` run (PRESET,
# default llama-3.1-8b, BF16 then FP8 at batch BATCH, default 1, after a 128-token prompt): the
# bench marks the last step of each decode run as a profiler range, and ncu profiles only there
# (--profile-from-start off), every node of the step's CUDA graph alone, with the L2 flushed
# before each (its default) and the clocks left alone. Prints each kernel's isolated time and
# DRAM bandwidth per step (tests/gpu/ncu_summary.py); the report and its CSV go to $OUT.
source tests/gpu/lib.sh
PRESET=${PRESET:-llama-3.1-8b}
export FLINT_REQUIRE_GPU=1
banner
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "no ncu on this machine"; exit 1; }
echo "== ncu ($NCU) over one decode step of $PRESET, BF16 and FP8, batch ${BATCH:-1}"
timeout ${PROFILE_TIMEOUT:-360} "$NCU" --profile-from-start off --clock-control none --graph-profiling node \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__block_size,launch__registers_per_thread \
  --export "$OUT/step" --force-overwrite \
  $B/flint bench --preset "$PRESET" --dtype fp8 --batches ${BATCH:-1} --lengths ${LENGTHS:-128:8} > "$OUT/ncu-bench.log" 2>&1 || status=1
grep -E "decode|==PROF==|ERR" "$OUT/ncu-bench.log" | head -20
"$NCU" --import "$OUT/step.ncu-rep" --csv --page raw > "$OUT/step.csv" 2> "$OUT/ncu-import.err" || status=1
python3 tests/gpu/ncu_summary.py "$OUT/step.csv" "$(grep -oE 'copy bandwidth [0-9]+' "$OUT/ncu-bench.log" | grep -oE '[0-9]+' | head -1)" || status=1
exit $status
