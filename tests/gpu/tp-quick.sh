# Short tensor-parallel session: the TP model test, then decode at TP 1 and TP N (batch 1).
source tests/gpu/lib.sh
export FLINT_REQUIRE_GPU=1 FLINT_REQUIRE_TP=1
banner
hf_checkpoints
FLINT_HF_MODELS=/tmp/flint-hf timeout 120 $B/tests/gpu tensor_parallel --test-threads=1 --nocapture > $OUT/tp-model.log 2>&1; echo "test rc $?"
grep -E "^test .*(ok|FAILED)$|TP [0-9].*steps|not split|panicked|test result" $OUT/tp-model.log | tail -12
for w in 1 $N; do
  timeout 100 $B/flint bench --preset llama-3.1-8b --tp $w --batches ${BATCHES:-1} --lengths 128:128 --json-out $OUT/flint-8b-tp$w.json 2>&1 | grep -E "TP|batch|roofline|^ *1[0-9]*/" | grep -v breakdown | tail -4
done
[[ -n ${BIG:-} ]] && timeout 150 $B/flint bench --preset $BIG --tp $N --batches 1 --lengths 128:128 --json-out $OUT/flint-big-tp$N.json 2>&1 | grep -v breakdown | tail -6
