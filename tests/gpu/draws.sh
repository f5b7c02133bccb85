#!/usr/bin/env bash
# Tokens drawn on the device, on one GPU, from the repository root with .gpu/bundle carried:
# the sampling kernel test and the device draws against the host sampler; `flint generate` with
# sampled settings, whose tokens must equal those of OLD (a server binary that samples on the
# host from full logits, e.g. one built from the revision before device draws) for the same
# seed; then serving PRESET (random weights) under a temperature 0.8 / top-p 0.95 load and a
# greedy one, with this bundle's binary and with OLD. Logs under $OUT.
source tests/gpu/lib.sh
OLD=${OLD:-}
PRESET=${PRESET:-llama-3.1-8b}
CONC=${CONC:-256}
export FLINT_REQUIRE_GPU=1
banner
echo "== sampling kernel"
$B/tests/kernels sampling --test-threads=1 --nocapture > "$OUT/kernels-sampling.log" 2>&1 || status=1
grep -E "^test .*(ok|FAILED)$|panicked" "$OUT/kernels-sampling.log"
echo "== device draws against the host sampler"
$B/tests/gpu-engine --test-threads=1 --nocapture > "$OUT/draws.log" 2>&1 || status=1
grep -E "^test .*(ok|FAILED)$|device draws|panicked|seed" "$OUT/draws.log"
if [[ -n $OLD ]]; then
  echo "== flint generate, sampled: device draws against host sampling (same seed)"
  i=0
  for args in "--temperature 0.8 --top-p 0.95" "--temperature 1.0" "--temperature 0.7 --min-p 0.1" "--temperature 1.3 --top-p 0.5 --min-p 0.02"; do
    i=$((i + 1))
    for bin in new old; do
      exe=$B/flint; [[ $bin == old ]] && exe=$OLD
      $exe generate --device cuda --random-weights llama-3.2-1b --prompt "Once upon a time" --max-tokens 64 \
        --ignore-eos --seed $((100 + i)) $args --json > "$OUT/gen-$bin-$i.json" 2> "$OUT/gen-$bin-$i.err" || status=1
    done
    python3 - "$OUT/gen-new-$i.json" "$OUT/gen-old-$i.json" "$args" <<'PY' || status=1
import json, sys
a, b = (json.load(open(p))["token_ids"] for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
print(f"{sys.argv[3]:45s} {same}/{len(b)} tokens equal, {len(set(a))} distinct")
sys.exit(0 if a == b else 1)
PY
  done
fi
port=50300
serve_load() {  # binary, tag, load flags...
  local exe=$1 tag=$2; shift 2
  $exe serve --device cuda --random-weights "$PRESET" --port $port --max-running 512 --max-batch-tokens 2048 \
    --max-model-len 1024 > "$OUT/serve-$tag.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do grep -q "serving" "$OUT/serve-$tag.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  timeout ${LIMIT:-150} $B/flint bench --server 127.0.0.1:$port --num-requests ${REQUESTS:-$((2 * CONC))} --concurrency $CONC \
    --prompt-len 128 --output-len 128 "$@" > "$OUT/load-$tag.txt" 2>&1 || status=1
  echo "-- $tag: $*"; grep -Ei "output tok|tpot|ttft|finished|error" "$OUT/load-$tag.txt" | head -6
  kill -TERM $pid; wait $pid 2>/dev/null
  port=$((port + 1))
}
echo "== serving $PRESET (random weights), $CONC concurrent, prompt 128, output 128"
serve_load $B/flint new-sampled --temperature 0.8 --top-p 0.95
serve_load $B/flint new-greedy
if [[ -n $OLD ]]; then REQUESTS=${OLD_REQUESTS:-$CONC} serve_load "$OLD" old-sampled --temperature 0.8 --top-p 0.95; fi
exit $status
