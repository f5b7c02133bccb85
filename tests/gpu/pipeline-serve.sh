#!/usr/bin/env bash
# Serving through pipeline stages on a multi-GPU machine: a random-weight PRESET (default
# llama-3.1-8b) saved by transformers, served over all N GPUs as --pp N with one step at a time
# (--steps-in-flight 1), as --pp N with a step per stage in flight (the default), and as
# --tp N, each under the same closed-loop load from `flint bench --server`. From the repository
# root with .gpu/bundle carried; logs and reports under $OUT.
set -uo pipefail
B=.gpu/bundle; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
N=$(nvidia-smi -L | wc -l)
PRESET=${PRESET:-llama-3.1-8b}
M=/tmp/flint-$PRESET
echo "revision $(cat $B/REVISION); $N x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
[[ -f $M/config.json ]] || python3 tests/gpu/save_preset.py --preset "$PRESET" --out "$M" 2>&1 | grep -v Writing | tail -2
cat "$M"/*.safetensors > /dev/null
port=50200
for layout in "--pp $N --steps-in-flight 1" "--pp $N" "--tp $N"; do
  tag=$(echo "$layout" | tr -d ' -')
  $B/flint serve --device cuda $layout --model "$M" --port $port --max-running ${RUNNING:-128} \
    --max-batch-tokens ${BATCH_TOKENS:-2048} --max-model-len 1024 > "$OUT/serve-$tag.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do grep -q "serving" "$OUT/serve-$tag.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  echo "== $PRESET $layout: ${REQUESTS:-512} requests, ${CONC:-128} at once, prompt ${PROMPT:-128}, output ${OUTPUT:-128}"
  timeout ${LIMIT:-150} $B/flint bench --server 127.0.0.1:$port --num-requests ${REQUESTS:-512} --concurrency ${CONC:-128} \
    --prompt-len ${PROMPT:-128} --output-len ${OUTPUT:-128} > "$OUT/load-$tag.txt" 2>&1
  grep -E "throughput|duration|ttft|tpot|itl|^ms" "$OUT/load-$tag.txt"
  kill -TERM $pid; wait $pid; echo "server exit $?"
  grep -iE "error|panic" "$OUT/serve-$tag.log" | head -3
  port=$((port + 1))
done
