#!/usr/bin/env bash
# Serving through pipeline stages on a multi-GPU machine, under closed-loop loads from
# `flint bench --server` at each concurrency of CONCS (prompt PROMPT, output OUTPUT tokens,
# REQ_MULT (default 3) x concurrency requests). LAYOUTS (default: "--pp N --steps-in-flight 1", "--pp N",
# "--tp N" over all N GPUs) each serve PRESET (default llama-3.1-8b): a checkpoint saved by
# transformers, or with RANDOM=1 the preset's random weights made on the GPUs (for models too
# big to save quickly). FLINT names another server binary to compare (default the bundle's);
# LOAD_ARGS adds flags to the load generator (e.g. "--temperature 0.8 --top-p 0.95").
# From the repository root with .gpu/bundle carried; logs under $OUT.
source tests/gpu/lib.sh
PRESET=${PRESET:-llama-3.1-8b}
banner
if [[ -n ${RANDOM_WEIGHTS:-} ]]; then
  MODEL=(--random-weights "$PRESET")
else
  M=/tmp/flint-$PRESET
  [[ -f $M/config.json ]] || python3 tests/gpu/save_preset.py --preset "$PRESET" --out "$M" 2>&1 | grep -v Writing | tail -2
  cat "$M"/*.safetensors > /dev/null
  MODEL=(--model "$M")
fi
if [[ -z ${LAYOUTS:-} ]]; then
  LAYOUTS=("--pp $N --steps-in-flight 1" "--pp $N" "--tp $N")
else
  IFS=';' read -r -a LAYOUTS <<< "$LAYOUTS"
fi
port=50200
for layout in "${LAYOUTS[@]}"; do
  tag=${TAG:-}$(echo "$layout" | tr -d ' -')
  mport=$((port + 1000))
  ${FLINT:-$B/flint} serve --device cuda $layout "${MODEL[@]}" --port $port --metrics-port $mport --max-running ${RUNNING:-512} \
    --max-batch-tokens ${BATCH_TOKENS:-2048} --max-model-len 1024 > "$OUT/serve-$tag.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do grep -q "serving" "$OUT/serve-$tag.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  for c in ${CONCS:-128}; do
    echo "== $PRESET $layout: concurrency $c, $((${REQ_MULT:-3} * c)) requests, prompt ${PROMPT:-128}, output ${OUTPUT:-128}"
    timeout ${LIMIT:-150} $B/flint bench --server 127.0.0.1:$port --num-requests $((${REQ_MULT:-3} * c)) --concurrency $c \
      --prompt-len ${PROMPT:-128} --output-len ${OUTPUT:-128} ${LOAD_ARGS:-} > "$OUT/load-$tag-c$c.txt" 2>&1
    grep -E "throughput|TPOT|TTFT|failed" "$OUT/load-$tag-c$c.txt"
  done
  # The engine's time per step: waiting for the model, and the rest (scheduling, sampling, streaming).
  python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$mport/metrics').read().decode())" \
    | grep -E "^flint_steps_total|^flint_step_" || true
  kill -TERM $pid; wait $pid; echo "server exit $?"
  grep -iE "error|panic" "$OUT/serve-$tag.log" | head -3
  port=$((port + 1))
done
