#!/usr/bin/env bash
# GPU verification suite for a lent card: steps in priority order under a time budget.
#
#   bash bench/gpu_suite.sh OUTDIR [--budget SECONDS] [--only STEP,...] [--dry-run]
#
# OUTDIR (required) receives everything as it is made: gpu_suite.log (all output), steps.csv
# (one row per step: name, status, exit code, seconds), gpu_check.csv, the benchmarks' CSVs,
# info.json and summary.md. A run killed from outside still leaves every finished step there.
#
# Order: card info -> small-shape correctness of every Triton kernel x fp32/bf16/fp16 against
# float64 references -> headline benchmarks (ours vs eager; torch.compile only at the routing
# headline shape) -> CUDA extension build (required: a failed build fails the suite) and its
# tests -> everything else. Each step runs under `timeout`, capped by what is left of the
# budget; a step whose estimate no longer fits is skipped (and listed). The exit code is 1 when
# any step failed or timed out, 0 otherwise (skipped steps do not fail the run).
#
# --budget SECONDS  whole-run budget (default 540: one 10-minute device command with margin;
#                   pass less to keep device time for a rerun).
# --only STEP,...   run only these steps (names as in steps.csv), e.g. to rerun what failed
#                   or changed: --only install,correctness,bench_attention
# --dry-run         the same steps on CPU with tiny shapes: Triton through its interpreter, no
#                   CUDA build (the CPU extension is checked instead). CI runs this.
# Peers: wheels in bench/peers/ (bash bench/fetch_peers.sh, carried to the card) are installed
# after the project, so the loss benchmarks add cut-cross-entropy and liger-kernel rows.
set -uo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

OUT="" BUDGET=540 DRY=0 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="${2:-}"; shift 2 || { usage >&2; exit 2; } ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    --only) ONLY="${2:-}"; shift 2 || { usage >&2; exit 2; } ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [ -z "$OUT" ]; then OUT="$1"; shift; else
         echo "gpu_suite.sh: one OUTDIR only (got '$OUT' and '$1')" >&2; exit 2; fi ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_suite.sh: OUTDIR is required" >&2; usage >&2; exit 2; }
STEP_NAMES=(card install peers info correctness bench_routing_headline bench_linear_cross_entropy
            bench_attention bench_sampled_softmax bench_routing_large bench_retrieval cuda_build
            cuda_extension_loaded cuda_tests all_cuda_tests bench_train summary)
for s in ${ONLY//,/ }; do
  [[ " ${STEP_NAMES[*]} " == *" $s "* ]] || { echo "gpu_suite.sh: --only: unknown step '$s' (steps: ${STEP_NAMES[*]})" >&2; exit 2; }
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }

# OUTDIR is the caller's: made and resolved to an absolute path before the cd to the repo root
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
LOG="$OUT/gpu_suite.log"
STEPS="$OUT/steps.csv"
[ -f "$STEPS" ] || echo "step,status,exit_code,seconds" > "$STEPS"
exec > >(tee -a "$LOG") 2>&1

export SEQREC_FAST_BENCH_DIR="$OUT" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
fi
START=$(date +%s)
FAILED=() SKIPPED=()

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME ESTIMATE_S LIMIT_S CMD...: run CMD under timeout when ESTIMATE_S still fits.
step() {
  local name=$1 est=$2 lim=$3; shift 3
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local left=$(( BUDGET - $(elapsed) ))
  if (( left < est )); then
    echo "--- skip $name: needs about ${est}s, ${left}s of the budget left"
    SKIPPED+=("$name"); echo "$name,skipped,,0" >> "$STEPS"; return 0
  fi
  (( lim > left )) && lim=$left
  echo; echo "=== [$(elapsed)s] $name (limit ${lim}s): $*"
  local t0 rc st
  t0=$(date +%s)
  timeout --kill-after=10 "$lim" "$@"; rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then st=ok; echo "=== ok $name (${dt}s)"
  elif (( rc == 124 || rc == 137 )); then st=timeout; echo "!!! TIMEOUT $name after ${dt}s"
  else st=failed; echo "!!! FAILED $name (exit $rc, ${dt}s)"; fi
  [ "$st" = ok ] || FAILED+=("$name")
  echo "$name,$st,$rc,$dt" >> "$STEPS"
  return $rc
}



# benchmark arguments: headline shapes on the card, tiny ones in the dry run
if [ "$DRY" = 1 ]; then
  ROUTING_HEAD=(--shapes 3,8,2,16 --variants mind,dr --providers eager,triton --reps 1)
  ROUTING_BIG=(--shapes 2,12,3,16 --variants dr --providers eager,triton --reps 1)
  ATTENTION=(--shapes 3,8,2,16 --providers eager,triton --modes fwd+bwd --reps 1)
  LCE=(--quick --providers eager,triton --reps 1)
  SAMPLED=(--quick --providers eager,triton --reps 1)
  RETRIEVAL=(--shapes 4,2,300,16,10 --providers torch,triton --reps 1)
else
  ROUTING_HEAD=(--shapes 4096,50,4,64 --variants mind,dr --modes fwd+bwd --providers eager,compile,triton)
  ROUTING_BIG=(--shapes 8192,200,8,64 --variants dr --modes fwd+bwd --providers eager,triton)
  ATTENTION=(--shapes 4096,50,4,64 --modes fwd+bwd --providers eager,triton --dtype fp32,bf16)
  LCE=(--gpu-suite)
  SAMPLED=(--gpu-suite)
  RETRIEVAL=(--gpu-suite --dtype bf16,fp32 --providers ours,torch)
fi

echo "gpu_suite: budget ${BUDGET}s, dry run $DRY, out $OUT, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 1. the card and the software
if [ "$DRY" = 1 ]; then
  step card 2 30 python -c "import platform, torch; print('dry run on', platform.machine(), 'torch', torch.__version__)"
else
  step card 2 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  # pure-Python editable install first, so the Triton steps do not wait for the CUDA build
  step install 20 120 env SEQREC_FAST_SKIP_EXT=1 python -m pip install --no-deps --no-build-isolation -e .
  # the public peers of the loss benchmarks (cce, liger): no network here, so their wheels come
  # in bench/peers/ (bash bench/fetch_peers.sh before the run, and carry bench/peers)
  if compgen -G "bench/peers/*.whl" > /dev/null; then
    step peers 5 60 python -m pip install --no-deps --no-index bench/peers/*.whl
  else
    echo "--- peers: no wheels in bench/peers (bash bench/fetch_peers.sh, then carry bench/peers): the loss benchmarks will have no cce/liger rows"
  fi
fi
step info 3 60 python -c "import json, seqrec_fast; i = seqrec_fast.info(); print(json.dumps(i, indent=1)); open('$OUT/info.json', 'w').write(json.dumps(i, indent=1))"

# 2. correctness of every Triton kernel at every dtype (values and gradients vs float64)
CHECK_ARGS=(--out "$OUT"); [ "$DRY" = 1 ] && CHECK_ARGS+=(--dry-run)
step correctness 60 240 python bench/gpu_check.py "${CHECK_ARGS[@]}"

# 3. headline benchmarks (CSV rows land in OUTDIR through SEQREC_FAST_BENCH_DIR)
step bench_routing_headline 90 200 python bench/routing.py "${ROUTING_HEAD[@]}"
step bench_linear_cross_entropy 60 180 python bench/linear_cross_entropy.py "${LCE[@]}"
step bench_attention 40 120 python bench/attention.py "${ATTENTION[@]}"
step bench_sampled_softmax 30 120 python bench/sampled_softmax.py "${SAMPLED[@]}"
step bench_routing_large 30 120 python bench/routing.py "${ROUTING_BIG[@]}"
if [ -f bench/retrieval.py ]; then
  step bench_retrieval 40 150 python bench/retrieval.py "${RETRIEVAL[@]}"
fi

# 4. the CUDA extension: a failed build is a failure of the suite, never a silent fallback
if [ "$DRY" = 1 ]; then
  step cuda_build 2 60 python -c "import seqrec_fast; i = seqrec_fast.info(); assert i['extension'], i['extension_error']; print('dry run: CPU extension loaded; CUDA build not attempted')"
else
  ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  step cuda_build 120 360 env SEQREC_FAST_REQUIRE_EXT=1 SEQREC_FAST_CUDA_ARCHS="${SEQREC_FAST_CUDA_ARCHS:-$ARCH}" MAX_JOBS=16 \
    python -m pip install --no-deps --no-build-isolation -e .
  step cuda_extension_loaded 5 60 python -c "import seqrec_fast; i = seqrec_fast.info(); assert i['extension_cuda'], i; print('CUDA kernels in the extension')"
fi
step cuda_tests 60 240 python -m pytest -q -x -m cuda tests/test_routing.py

# 5. everything else, as far as the budget goes
if [ "$DRY" = 0 ]; then
  step all_cuda_tests 240 420 python -m pytest -q -m cuda tests
  step bench_train 90 240 python bench/train.py --gpu-suite
fi
step summary 1 60 sh -c "python bench/summary.py '$OUT' > '$OUT/summary.md' && cat '$OUT/summary.md'"

echo
echo "gpu_suite: $(elapsed)s of ${BUDGET}s; failed: ${FAILED[*]:-none}; skipped: ${SKIPPED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
