#!/usr/bin/env bash
# Tensor and pipeline parallelism on a multi-GPU machine, from the repository root with
# .gpu/bundle carried (cargo xtask gpu-bundle). NCCL's NVLink multicast stays off.
#   bash tests/gpu/parallel.sh check   the peer-to-peer all-reduce test, TP / PP / TP x PP
#                                      checkpoints against one GPU and transformers, all-reduce
#                                      latency (NCCL vs p2p over both links) at TP 2 and 4, 8B
#                                      batch 1 at TP N over each link and over NCCL alone
#   bash tests/gpu/parallel.sh links   PRESET (default llama-3.3-70b) batch 1 at TP N over the
#                                      flag link, the lamport link and NCCL alone, in one run
#   bash tests/gpu/parallel.sh table   the 4-GPU table: PRESET (default llama-3.3-70b) at TP 4,
#                                      PP 4 and TP 2 x PP 2 over BATCHES; 8B at TP 1, 2, 4
# Logs and JSON go to $OUT (or ./gpu-out).
source tests/gpu/lib.sh
MODE=${1:-check}
export FLINT_REQUIRE_GPU=1 FLINT_REQUIRE_TP=1
banner
if [[ $MODE == check ]]; then
  nvidia-smi topo -m 2>/dev/null | head -$((N + 1))
  timeout 90 $B/tests/gpu p2p_all_reduce --test-threads=1 --nocapture > "$OUT/p2p-test.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|panicked|world [0-9] rank 0" "$OUT/p2p-test.log" | tail -6
  hf_checkpoints
  FLINT_HF_MODELS=/tmp/flint-hf timeout 240 $B/tests/gpu tensor_parallel --test-threads=1 --nocapture > "$OUT/parallel-model.log" 2>&1 || status=1
  grep -E "^test .*(ok|FAILED)$|steps, worst|not split|panicked|test result" "$OUT/parallel-model.log" | tail -40
  for w in 2 4; do
    [[ $w -le $N ]] || continue
    timeout 90 $B/flint bench --allreduce --tp $w --json-out "$OUT/allreduce-tp$w.json" 2>&1 | tail -9 || status=1
  done
  for p2p in "--p2p-link flags" "--p2p-link lamport" "--no-p2p"; do
    timeout 100 $B/flint bench --preset llama-3.1-8b --tp $N --batches 1,16 --lengths 128:64 $p2p --json-out "$OUT/8b-tp$N${p2p// /}.json" 2>&1 | grep -E "TP $N.*batch|breakdown" | tail -4 || status=1
  done
fi
if [[ $MODE == links ]]; then
  PRESET=${PRESET:-llama-3.3-70b}
  for p2p in "--p2p-link flags" "--p2p-link lamport" "--no-p2p"; do
    echo "== $PRESET TP $N $p2p"
    timeout ${LIMIT:-150} $B/flint bench --preset $PRESET --tp $N --batches ${BATCHES:-1} --lengths ${LENGTHS:-128:64} $p2p --json-out "$OUT/links-tp$N${p2p// /}.json" 2>&1 | grep -E "TP $N.*batch|breakdown|roofline" | tail -4 || status=1
  done
fi
if [[ $MODE == table ]]; then
  PRESET=${PRESET:-llama-3.3-70b}
  BATCHES=${BATCHES:-1,16,64,256}
  for layout in "4 1" "1 4" "2 2"; do
    set -- $layout
    echo "== $PRESET TP $1 x PP $2"
    timeout ${LIMIT:-170} $B/flint bench --preset $PRESET --tp $1 --pp $2 --batches $BATCHES --lengths ${LENGTHS:-128:64} --json-out "$OUT/table-tp$1-pp$2.json" 2>&1 | grep -E "TP $1 x PP $2" | tail -6 || status=1
  done
  if [[ -n ${SCALING:-} ]]; then
    for w in 1 2 4; do
      timeout 80 $B/flint bench --preset llama-3.1-8b --tp $w --batches 1 --lengths 128:128 --json-out "$OUT/8b-tp$w.json" 2>&1 | grep -E "batch 1:|roofline" | tail -2 || status=1
    done
  fi
fi
exit $status
