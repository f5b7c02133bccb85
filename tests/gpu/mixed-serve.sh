#!/usr/bin/env bash
# Serving PRESET (random weights) on one GPU under a sampled load (temperature 0.8, top-p 0.95)
# alone, then with a second client beside it whose requests carry a repetition penalty (their
# rows are sampled on the host, the others' drawn on the device in the same steps). From the
# repository root with .gpu/bundle carried; logs under $OUT.
source tests/gpu/lib.sh
PRESET=${PRESET:-llama-3.1-8b}
CONC=${CONC:-256}; PENALIZED=${PENALIZED:-8}
export FLINT_REQUIRE_GPU=1
banner
port=50400
$B/flint serve --device cuda --random-weights "$PRESET" --port $port --metrics-port $((port + 1)) --max-running 512 \
  --max-batch-tokens 2048 --max-model-len 1024 > "$OUT/serve-mixed.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "serving" "$OUT/serve-mixed.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
load() {  # tag, concurrency, requests, flags...
  local tag=$1 conc=$2 n=$3; shift 3
  timeout ${LIMIT:-150} $B/flint bench --server 127.0.0.1:$port --num-requests $n --concurrency $conc \
    --prompt-len 128 --output-len 128 --temperature 0.8 --top-p 0.95 "$@" > "$OUT/load-$tag.txt" 2>&1 || status=1
}
mixed_steps() { curl -s 127.0.0.1:$((port + 1))/metrics | grep -E "^flint_mixed_draw_steps_total" || echo "no metric"; }
load warmup $CONC $CONC
echo "== $CONC sampled alone"; load alone $CONC $((2 * CONC))
grep -Ei "output tok|tpot" "$OUT/load-alone.txt" | head -3; mixed_steps
echo "== $((CONC - PENALIZED)) sampled beside $PENALIZED with repetition penalty 1.1"
load penalized $PENALIZED $((2 * PENALIZED)) --repetition-penalty 1.1 --seed 1 &
lp=$!
load beside $((CONC - PENALIZED)) $((2 * (CONC - PENALIZED)))
wait $lp
for t in beside penalized; do echo "-- $t"; grep -Ei "output tok|tpot" "$OUT/load-$t.txt" | head -3; done
mixed_steps
kill -TERM $pid; wait $pid 2>/dev/null
exit $status
