#!/usr/bin/env bash
# Two processes on one multi-GPU machine, one GPU each, as two nodes of `flint serve --tp 2
# --nnodes 2` and then of `flint serve --pp 2 --nnodes 2` (the same flags work across hosts):
# serve a load-generator run through node 0, then SIGTERM node 0 and check node 1 leaves
# cleanly. From the repository root, with .gpu/bundle carried; logs under $OUT.
source tests/gpu/lib.sh
banner
hf_checkpoints
M=/tmp/flint-hf/llama-gqa4-hd128
port=29400
for layout in "--tp 2" "--pp 2"; do
  tag=${layout// /}; tag=${tag//-/}
  MASTER=127.0.0.1:$port; port=$((port + 10))
  echo "== serve $layout --nnodes 2"
  CUDA_VISIBLE_DEVICES=1 $B/flint serve --device cuda $layout --nnodes 2 --node-rank 1 --master-addr $MASTER --model $M --max-running 16 > "$OUT/$tag-node1.log" 2>&1 &
  n1=$!
  CUDA_VISIBLE_DEVICES=0 $B/flint serve --device cuda $layout --nnodes 2 --node-rank 0 --master-addr $MASTER --model $M --port 50160 --max-running 16 > "$OUT/$tag-node0.log" 2>&1 &
  n0=$!
  for _ in $(seq 240); do grep -q "serving" "$OUT/$tag-node0.log" && break; sleep 0.5; done
  $B/flint bench --server 127.0.0.1:50160 --num-requests 16 --concurrency 4 --prompt-len 32:96 --output-len 16 2>&1 | tail -6
  kill -TERM $n0; wait $n0; echo "node 0 exit $?"
  wait $n1; echo "node 1 exit $?"
  tail -2 "$OUT/$tag-node1.log"; grep -iE "error|panic" "$OUT/$tag-node0.log" | head -3
done
