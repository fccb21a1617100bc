#!/usr/bin/env bash
# One-command GPU check: turns a lent GPU into numbers, even when cut short.
# Run from the repository root:   OUT=/some/dir BUDGET=480 bash scripts/gpu_check.sh
# Env: OUT (results folder, default ./gpu_check_out), BUDGET (seconds for everything,
#      default 480), PY (default python3), LAYERS (decode layers, default 32),
#      SMOKE=1 (every stage on the CPU at tiny shapes, interpret mode: checks the script),
#      STAGES (which stages, in order; default "env kernels decode1 sweep tests decode16").
# Stages (scripts/gpu_check.py has the details), most valuable first, each under `timeout`
# within what is left of BUDGET; a stage that fails or times out does not stop the rest, and
# every result is appended to $OUT/results.jsonl as it finishes. Expected on an H100/H200:
#   env       versions, device, GPU-path imports, copy / read bandwidth        ~15 s
#   kernels   7B linears: correctness; kernel vs XLA at N=1; switch; N=16     ~60-90 s
#   decode1   7B decode b1: base, unmerged pallas / reference, merged         ~40-50 s a row (est.)
#   sweep     unmerged block sweep (N=1) and switch tile sweep, time-shared   cap 45 s
#   tests     compiled GPU test classes (pytest -m gpu)                       ~60-90 s
#   decode16  7B decode b16: base, unmerged pallas / reference                ~40-50 s a row (est.)
#   report    gpu_check.json, benchmarks_gpu.md, tuning.py, summary.md        ~5 s
# With BUDGET=270: env, kernels (N=16 may be cut), decode1 and the sweep; tests and decode16
# only with more budget (or choose with STAGES="env kernels decode1 tests").
# $OUT ends with at most 6 files: results.jsonl stages.log gpu_check.json benchmarks_gpu.md
# tuning.py summary.md. Commit them with:  python3 scripts/gpu_check.py report --out DIR --docs
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${BUDGET:-480}
PY=${PY:-python3}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/stages.log"
export OUT LAYERS=${LAYERS:-32} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}  # merged at 7B
SCALE=1
if [[ ${SMOKE:-0} == 1 ]]; then  # interpret mode on a shared CI CPU: more time per stage
  export SMOKE JAX_PLATFORMS=cpu
  BUDGET=${SMOKE_BUDGET:-900} SCALE=3
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
fi
START=$SECONDS
REPORT_RESERVE=$([[ ${SMOKE:-0} == 1 ]] && echo 60 || echo 12)

# stage NAME MAX_SECONDS: run `gpu_check.py NAME` under min(MAX, what BUDGET has left)
stage() {
  local name=$1 max=$(($2 * SCALE)) left t rc status
  left=$((BUDGET - (SECONDS - START) - REPORT_RESERVE))
  t=$((max < left ? max : left))
  if ((t < 25)); then
    echo "== $name skipped: ${left}s of the budget left" | tee -a "$OUT/stages.log"
    echo "{\"stage\": \"$name\", \"part\": \"stage\", \"skipped\": \"budget (${left}s left)\"}" >> "$OUT/results.jsonl"
    return
  fi
  echo "== $name (timeout ${t}s) $(date +%T)" | tee -a "$OUT/stages.log"
  export STAGE_DEADLINE=$(($(date +%s) + t - 3))
  timeout -k 5 "$t" "$PY" scripts/gpu_check.py "$name" --out "$OUT" >> "$OUT/stages.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=TIMEOUT ;; *) status=FAILED ;; esac
  echo "   $name: $status (rc $rc) after $((SECONDS - START))s in all" | tee -a "$OUT/stages.log"
  echo "{\"stage\": \"$name\", \"part\": \"stage\", \"status\": \"$status\", \"rc\": $rc}" >> "$OUT/results.jsonl"
}

declare -A CAP=([env]=30 [kernels]=75 [decode1]=120 [sweep]=45 [tests]=90 [decode16]=90)
for name in ${STAGES:-env kernels decode1 sweep tests decode16}; do
  stage "$name" "${CAP[$name]}"
done
echo "== report ($((SECONDS - START))s in all)" | tee -a "$OUT/stages.log"
timeout -k 5 "$REPORT_RESERVE" "$PY" scripts/gpu_check.py report --out "$OUT" 2>>"$OUT/stages.log" \
  || echo "report failed: rerun  python3 scripts/gpu_check.py report --out $OUT" | tee -a "$OUT/stages.log"
