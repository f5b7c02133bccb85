#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle)
# and a baseline `flint` binary (BASE, default .gpu/base/flint, or .gpu/base/flint.xz unpacked).
#   bash tests/gpu/ab.sh
# The same bench (PRESET, default llama-3.1-8b, BF16 and FP8, BATCHES, LENGTHS) with the baseline
# and with the bundle's flint, alternating ROUNDS times (default 2) in one session of the machine,
# so that the two are compared on the same GPU; JSON per run into $OUT, decode rows printed.
source tests/gpu/lib.sh
PRESET=${PRESET:-llama-3.1-8b}
BASE=${BASE:-.gpu/base/flint}
[[ -x $BASE ]] || { xz -dc "$BASE.xz" > /tmp/flint-base && chmod +x /tmp/flint-base && BASE=/tmp/flint-base; }
export FLINT_REQUIRE_GPU=1
banner
for round in $(seq 1 ${ROUNDS:-2}); do
  for which in base new; do
    bin=$B/flint; [[ $which == base ]] && bin=$BASE
    echo "== $which (round $round)"
    timeout ${BENCH_TIMEOUT:-300} $bin bench --preset "$PRESET" --dtype fp8 --batches ${BATCHES:-1,8} --lengths ${LENGTHS:-128:128} \
      --json-out "$OUT/ab-$which-$round.json" 2>&1 | grep -E "batch [0-9]+:|in FP8|copy bandwidth" || status=1
  done
done
exit $status
