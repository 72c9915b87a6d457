#!/usr/bin/env bash
# GPU verification suite: build the extension (CUDA kernels for this card), run every
# cuda-marked test, run each benchmark's headline shapes, print one summary table.
#   bash bench/gpu_suite.sh [OUTDIR]      (default bench/results; log in OUTDIR/gpu_suite.log)
# Budget: under 5 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
export SEQREC_FAST_BENCH_DIR="$OUT" PYTHONUNBUFFERED=1
ARCH=$(python -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
export SEQREC_FAST_CUDA_ARCHS=${SEQREC_FAST_CUDA_ARCHS:-$ARCH}
status=0
step() { echo; echo "=== $* ==="; "$@" || { echo "!!! failed ($?): $*"; status=1; }; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step env MAX_JOBS=16 pip install --no-deps --no-build-isolation -e .
  step python -c "import json, seqrec_fast; print(json.dumps(seqrec_fast.info(), indent=1))"
  step python -m pytest -q -m cuda tests
  step python bench/routing.py --shapes 4096,50,4,64 1024,20,4,16 --modes fwd+bwd
  for b in attention softmax train; do
    [ -f "bench/$b.py" ] && step python "bench/$b.py" --gpu-suite
  done
  step python bench/summary.py "$OUT"
} 2>&1 | tee "$OUT/gpu_suite.log"
exit $status
