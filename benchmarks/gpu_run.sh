#!/usr/bin/env bash
# The accelerator benchmark on a bare GPU host, results into $OUT (set by the caller).
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh [extra accelerator.py flags]
#
# Needs jax (CUDA), flax, optax, orbax, chex, numpy and torch; no network, no TensorFlow.
# Writes $OUT/accelerator.json and the whole log to $OUT/accelerator.log. See
# docs/performance.md.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder for the results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

# Overlap collectives/copies with compute (a no-op on one GPU, harmless). Appended so that
# flags the caller already set are kept.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

{
  echo "== $(date -u +%FT%TZ) $(hostname) load: $(cat /proc/loadavg 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PYTHON" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())'
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' \
    || echo "torch: not importable"
  echo "XLA_FLAGS=$XLA_FLAGS"
  "$PYTHON" "$REPO/benchmarks/accelerator.py" --out "$OUT/accelerator.json" "$@"
} 2>&1 | tee "$OUT/accelerator.log"
exit "${PIPESTATUS[0]}"
