#!/usr/bin/env bash
# One-command GPU check: turns a lent GPU into numbers, even when cut short.
# Run from the repository root:   OUT=/some/dir BUDGET=480 bash scripts/gpu_check.sh
# Env: OUT (results folder, default ./gpu_check_out), BUDGET (seconds for everything,
#      default 480), PY (default python3), LAYERS (decode layers, default 32),
#      SMOKE=1 (every stage on the CPU at tiny shapes, interpret mode: checks the script).
# Stages (scripts/gpu_check.py has the details), most valuable first, each under `timeout`
# within what is left of BUDGET; a stage that fails or times out does not stop the rest, and
# every result is appended to $OUT/results.jsonl as it finishes:
#   env       versions, device, GPU-path imports, copy / read bandwidth      (~15 s)
#   kernels   7B linears: correctness, kernel vs XLA + block sweep at N=1,
#             switch + tile sweep, N=16                                     (~70-100 s)
#   decode1   7B decode b1: base, unmerged impl=pallas / reference, merged  (~25 s a row)
#   tests     compiled GPU test classes (pytest -m gpu)                     (~60 s)
#   decode16  7B decode b16: unmerged pallas / reference, base              (~25 s a row)
#   report    gpu_check.json, benchmarks_gpu.md, tuning.py, summary.md      (~5 s)
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

stage env 40
stage kernels 100
stage decode1 120
stage tests 60
stage decode16 90
echo "== report ($((SECONDS - START))s in all)" | tee -a "$OUT/stages.log"
timeout -k 5 "$REPORT_RESERVE" "$PY" scripts/gpu_check.py report --out "$OUT" 2>>"$OUT/stages.log" \
  || echo "report failed: rerun  python3 scripts/gpu_check.py report --out $OUT" | tee -a "$OUT/stages.log"
