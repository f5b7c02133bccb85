# Sourced by the tests/gpu scripts, from the repository root with .gpu/bundle carried
# (cargo xtask gpu-bundle): B (the bundle), OUT (logs and JSON; ./gpu-out unless set), status
# (1 once a step has failed; the scripts exit with it), N (GPUs on the machine) and helpers.
# NCCL's NVLink multicast stays off on every machine these scripts run on.
set -uo pipefail
B=.gpu/bundle
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
status=0
N=$(nvidia-smi -L 2>/dev/null | wc -l)

# The bundle's revision and the GPUs (also written to $OUT/gpu.txt).
banner() {
  echo "revision $(cat $B/REVISION); $N x $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
}

# The transformers checkpoints of tests/gpu/hf_models.py under /tmp/flint-hf, made once a machine
# (bounded by HF_TIMEOUT seconds, default 200).
hf_checkpoints() {
  [[ -d /tmp/flint-hf ]] && return 0
  timeout "${HF_TIMEOUT:-200}" python3 tests/gpu/hf_models.py --out /tmp/flint-hf > "$OUT/hf_models.log" 2>&1 && return 0
  status=1
  rm -rf /tmp/flint-hf  # a half-written folder would pass for a made one next time
  return 1
}
