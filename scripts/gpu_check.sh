#!/usr/bin/env bash
# The GPU check, run ON the GPU machine from the repository root (one device-tool call each; the machine
# gives 15 minutes in all, start included). scripts/gpu_bundle.sh prepares the carried pieces here and
# prints the exact calls.
#
#   bash scripts/gpu_check.sh quick [SECONDS]     # ~6.5 min: environment, speed of every method vs our LoRA
#                                                 # and PEFT's LoRA (bf16, SmolLM2-135M shape), 64-task
#                                                 # serving batch vs PEFT, tests/test_cuda.py, summary.md
#   bash scripts/gpu_check.sh quality [SECONDS]   # ~5.5 min: the real model (its first part left by quick or
#                                                 # stage on this warm machine), reduced quality protocols
#   bash scripts/gpu_check.sh stage               # keep the model's first part only (a quality-only lease)
#
# The budget (seconds this call may use; default 390 / 330 / 60, at most 570) is the argument, else
# $GPU_CHECK_BUDGET. Nothing runs past it: a step that does not fit is reported as "not run", with why.
# Results: $OUT/summary.md, $OUT/check.json (raw), $OUT/<mode>.log (+ tests.xml): what the tool brings back.
#
#   GPU_CHECK_DRY=1 PYTHON=... bash scripts/gpu_check.sh quick   # the plumbing on a CPU (scripts/gpu_dry_run.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s.%N)
MODE=${1:-}
case "$MODE" in quick|quality|stage) ;; *) echo "usage: bash scripts/gpu_check.sh quick|quality|stage [SECONDS]" >&2; exit 2;; esac
BUDGET=${2:-${GPU_CHECK_BUDGET:-}}
STATE=${GPU_CHECK_STATE:-/tmp/orchmoe-gpu}
OUT=${OUT:-$REPO/runs/gpu-check-$MODE}
PY=${PYTHON:-python3}
BUNDLE=${GPU_CHECK_BUNDLE:-$REPO/.gpu}  # the carried pieces (the dry run points it at what one call carries)
mkdir -p "$OUT" "$STATE"
STATE=$(cd "$STATE" && pwd) OUT=$(cd "$OUT" && pwd)  # absolute: subprocesses run elsewhere
exec > >(tee -a "$OUT/$MODE.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log is complete before the tool collects $OUT

echo "== gpu_check $MODE: state $STATE, results $OUT, budget ${BUDGET:-default}$([ "${GPU_CHECK_DRY:-0}" = 1 ] && echo ', DRY RUN on a CPU')"
if [ ! -f "$BUNDLE/common/MANIFEST.json" ]; then
  echo "gpu_check $MODE: cannot run: $BUNDLE/common is not here; run scripts/gpu_bundle.sh on the CPU machine and carry .gpu/common" >&2
  exit 3
fi
# The carried wheels (what the GPU image lacks), installed once per bundle into the state folder.
stamp=$(sha256sum "$BUNDLE/common/MANIFEST.json" | cut -c1-16)
if [ "$(cat "$STATE/site/.bundle" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$STATE/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$STATE/site" "$BUNDLE"/common/wheels/*.whl || { echo "gpu_check: installing the carried wheels failed" >&2; exit 3; }
  echo "$stamp" > "$STATE/site/.bundle"
fi
export PYTHONPATH="$STATE/site:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export ORCHMOE_CACHE=$STATE/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

args=("$MODE" --start "$START" --state "$STATE" --out "$OUT" --bundle "$BUNDLE")
[ -n "$BUDGET" ] && args+=(--budget "$BUDGET")
[ "${GPU_CHECK_DRY:-0}" = 1 ] && args+=(--dry)
"$PY" scripts/gpu_check.py "${args[@]}"
rc=$?
echo "== gpu_check $MODE finished after ${SECONDS} s, exit code $rc"
exit $rc
