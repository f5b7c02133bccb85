#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/bundle carried (cargo xtask gpu-bundle).
#   bash tests/gpu/run.sh [check|bench|startup|all|fp8-check|fp8-bench|fp8|tp] [PRESET]
# check:   every kernel against the CPU reference; transformers-built checkpoints against Flint;
#          SmolLM2 against the CPU's tokens (when the GGUF is there); `flint generate` on the GPU.
# bench:   cargo xtask bench for PRESET (default llama-3.1-8b), transformers eager beside it.
# (tests/gpu/tp-quick.sh: the TP model test and batch-1 decode at TP 1 and N, for short sessions.)
# tp:      every GPU of the machine: tensor-parallel checkpoints against one GPU and transformers,
#          NCCL all-reduce latency, generate/serve with --tp, 8B at TP 1..N and 70B at TP N.
# startup: process start to first token for PRESET saved as safetensors (in the page cache).
# The SmolLM2 GGUF (98 MB) is over one call's carry limit: carry .gpu/smol1, .gpu/smol2 and
# .gpu/smol3 (its three parts) in consecutive calls to one warm machine; they collect in /tmp.
# Logs and JSON go to $OUT (or ./gpu-out).
source tests/gpu/lib.sh
MODE=${1:-all}
PRESET=${2:-llama-3.1-8b}
export FLINT_REQUIRE_GPU=1
banner

SMOL=/tmp/flint-smol
mkdir -p $SMOL
for i in 1 2 3; do [[ -f .gpu/smol$i/part ]] && cp .gpu/smol$i/part $SMOL/part$i; done
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $GGUF && -f $SMOL/part1 && -f $SMOL/part2 && -f $SMOL/part3 ]]; then
  cat $SMOL/part1 $SMOL/part2 $SMOL/part3 > $GGUF
fi
if [[ -f $GGUF ]] && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c --quiet; then
  export FLINT_MODEL=$GGUF FLINT_REQUIRE_SMOLLM2=1
  echo "SmolLM2 GGUF present"
else
  echo "SmolLM2 GGUF not present (parts: $(ls $SMOL | tr '\n' ' '))"
fi

if [[ $MODE == check || $MODE == all ]]; then
  echo "== kernels against flint-cpu"
  $B/tests/kernels --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|test result" "$OUT/kernels.log" | tail -12
  echo "largest errors:"; grep "rel err" "$OUT/kernels.log" | sort -g -k2 -t'|' | awk '{print $NF, $0}' | sort -g | tail -3 | cut -d' ' -f2-
  echo "== device draws against the host sampler"
  $B/tests/gpu-engine --test-threads=1 --nocapture > "$OUT/draws.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|device draws|panicked|test result" "$OUT/draws.log" | tail -4
  echo "== transformers checkpoints"
  hf_checkpoints
  grep -E "parameters|seed|Error" "$OUT/hf_models.log"
  FLINT_HF_MODELS=/tmp/flint-hf $B/tests/gpu --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|worst|matches|SmolLM2|panicked|test result" "$OUT/model.log" | tail -20
  echo "== flint generate on the GPU"
  $B/flint generate --random-weights llama-3.2-1b --prompt "Hello" --max-tokens 16 --ignore-eos --json > "$OUT/gen-random.json" 2>&1 || status=1
  python3 -c "import json,sys; g=json.load(open(sys.argv[1])); print('random llama-3.2-1b:', g['device'], len(g['token_ids']), 'tokens,', round(g['timings']['decode_tokens_per_s'],1), 'tok/s')" "$OUT/gen-random.json" || cat "$OUT/gen-random.json"
  if [[ -n ${FLINT_MODEL:-} ]]; then
    for dev in cuda cpu; do
      $B/flint generate --device $dev --prompt "What is the capital of France?" --max-tokens 24 --json > "$OUT/gen-smol-$dev.json" 2>&1 || status=1
      python3 -c "import json,sys; g=json.load(open(sys.argv[1])); print(g['device'], repr(g['text']), round(g['timings']['decode_tokens_per_s'],1), 'tok/s')" "$OUT/gen-smol-$dev.json" || cat "$OUT/gen-smol-$dev.json"
    done
  fi
  echo "== flint serve on the GPU, loaded by flint bench --server"
  SERVE_MODEL=${FLINT_MODEL:-/tmp/flint-hf/llama-gqa4-hd128}
  $B/flint serve --device cuda --model "$SERVE_MODEL" --port 50151 --max-running 32 --max-batch-tokens 2048 > "$OUT/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do grep -q "serving" "$OUT/serve.log" && break; sleep 0.5; done
  $B/flint bench --server 127.0.0.1:50151 --num-requests 64 --concurrency 16 --prompt-len 64:256 --output-len 64 2>&1 | tail -12 || status=1
  kill -TERM $pid; wait $pid || true
  tail -2 "$OUT/serve.log"
fi
if [[ $MODE == bench || $MODE == all ]]; then
  echo "== bench $PRESET"
  $B/xtask bench --preset "$PRESET" --out "$OUT" --flint $B/flint || status=1
fi
if [[ $MODE == fp8-check || $MODE == fp8 ]]; then
  echo "== FP8: kernels, transformers checkpoints (BF16 and FP8 paths), generate and serve in FP8"
  $B/tests/kernels --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|test result" "$OUT/kernels.log" | tail -14
  grep -E "fp8.*rel err|quantize" "$OUT/kernels.log" | sort -g -k4 | tail -3
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf $B/tests/gpu --test-threads=1 --nocapture > "$OUT/model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|worst|fp8|panicked|test result" "$OUT/model.log" | tail -24
  $B/flint generate --random-weights llama-3.2-1b --dtype fp8 --prompt "Hello" --max-tokens 16 --ignore-eos --json > "$OUT/gen-random-fp8.json" 2>&1 || status=1
  python3 -c "import json,sys; g=json.load(open(sys.argv[1])); print('random llama-3.2-1b fp8:', g['device'], len(g['token_ids']), 'tokens,', round(g['timings']['decode_tokens_per_s'],1), 'tok/s')" "$OUT/gen-random-fp8.json" || cat "$OUT/gen-random-fp8.json"
  $B/flint serve --device cuda --dtype fp8 --model /tmp/flint-hf/llama-gqa4-hd128 --port 50152 --max-running 32 --max-batch-tokens 2048 > "$OUT/serve-fp8.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do grep -q "serving" "$OUT/serve-fp8.log" && break; sleep 0.5; done
  $B/flint bench --server 127.0.0.1:50152 --num-requests 48 --concurrency 16 --prompt-len 64:256 --output-len 64 2>&1 | tail -6 || status=1
  kill -TERM $pid; wait $pid || true
  echo "== FP8 accuracy, $PRESET random weights on the GPU"
  $B/flint eval --device cuda --random-weights "$PRESET" --max-text-tokens 2048 --json-out "$OUT/eval-$PRESET-fp8.json" 2>/dev/null || status=1
fi
if [[ $MODE == fp8-bench || $MODE == fp8 ]]; then
  echo "== bench $PRESET BF16 then FP8"
  $B/flint bench --preset "$PRESET" --dtype fp8 --batches ${BATCHES:-1,8,32,128} --lengths ${LENGTHS:-128:128,2048:256} --json-out "$OUT/flint-$PRESET-fp8.json" || status=1
fi
if [[ $MODE == tp ]]; then
  export FLINT_REQUIRE_TP=1
  echo "== $N GPUs"; nvidia-smi topo -m 2>/dev/null | head -$((N + 1))
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf RUST_LOG=info timeout 300 $B/tests/gpu tensor_parallel --test-threads=1 --nocapture > "$OUT/tp-model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|TP [0-9]|panicked|test result" "$OUT/tp-model.log" | tail -14
  for w in $(seq 2 $N); do
    [[ $w == 2 || $w == 4 || $w == 8 ]] || continue
    $B/flint bench --allreduce --tp $w --json-out "$OUT/allreduce-tp$w.json" || status=1
  done
  $B/flint generate --device cuda --tp $N --model /tmp/flint-hf/llama-gqa4-hd128 --raw --prompt "Hello" --max-tokens 16 --ignore-eos --json > "$OUT/gen-tp.json" 2>&1 || status=1
  python3 -c "import json,sys; g=json.load(open(sys.argv[1])); print('generate --tp:', g['device'], len(g['token_ids']), 'tokens')" "$OUT/gen-tp.json" || cat "$OUT/gen-tp.json"
  $B/flint serve --device cuda --tp $N --model /tmp/flint-hf/llama-gqa4-hd128 --port 50153 --max-running 32 --max-batch-tokens 2048 > "$OUT/serve-tp.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do grep -q "serving" "$OUT/serve-tp.log" && break; sleep 0.5; done
  $B/flint bench --server 127.0.0.1:50153 --num-requests 64 --concurrency 16 --prompt-len 64:256 --output-len 64 2>&1 | tail -8 || status=1
  kill -TERM $pid; wait $pid || true
  for w in 1 $N; do
    echo "== llama-3.1-8b at TP $w"
    $B/flint bench --preset llama-3.1-8b --tp $w --batches ${BATCHES:-1,8,32} --lengths ${LENGTHS:-128:128} --json-out "$OUT/flint-8b-tp$w.json" 2>&1 | grep -v "^  " || status=1
  done
  if [[ -n ${BIG:-} ]]; then
    echo "== $BIG at TP $N"
    $B/flint bench --preset "$BIG" --tp $N --batches ${BIG_BATCHES:-1,8} --lengths 128:128 --json-out "$OUT/flint-big-tp$N.json" 2>&1 | grep -v "^  " || status=1
  fi
fi
if [[ $MODE == startup || $MODE == all ]]; then
  echo "== start-up: $PRESET from safetensors in the page cache"
  [[ -f /tmp/flint-ckpt/config.json ]] || python3 tests/gpu/save_preset.py --preset "$PRESET" --out /tmp/flint-ckpt 2>&1 | grep -v Writing | tail -2
  cat /tmp/flint-ckpt/*.safetensors > /dev/null
  du -sh /tmp/flint-ckpt
  for run in 1 2 3; do
    start=$(date +%s.%N)
    $B/flint generate --model /tmp/flint-ckpt --device cuda --prompt "Hello" --raw --max-tokens 1 --json > "$OUT/startup-$run.json" 2>&1 || status=1
    end=$(date +%s.%N)
    echo "run $run: process start to first token (and exit): $(python3 -c "print(round($end - $start, 2))") s"
  done
fi
exit $status
