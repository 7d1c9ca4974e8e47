#!/usr/bin/env bash
# The GPU check of issue 9, run ON the GPU machine from the repository root, in three stages of < 10 min
# (one device-tool call each; scripts/gpu_bundle.sh prepares the pieces they carry and prints the calls):
#
#   stage1  install the carried wheels, keep the model's first half, run tests/test_cuda.py, speed at the
#           SmolLM2-135M shape (every method vs LoRA and PEFT LoRA, bf16, random weights)
#   stage2  join + check + convert the model, unpack SuperNI, quality protocol ni100-quick (lora, poly, mhr,
#           orchmoe; seed 0) until the call's time is up (resumable: finished runs are kept)
#   stage3  speed at a 1.3B shape, serving (64 prompts of 64 tasks vs PEFT's mixed-adapter batch), the rest of
#           the quality runs, and summary.md: every target as PASS / FAIL. Run it again (while the machine is
#           warm) to go on with unfinished quality runs: what is done is skipped.
#
# Results go to $OUT (what the device tool brings back: <= 8 files a call) and to $GPU_CHECK_STATE/results
# (default /tmp/orchmoe-gpu, kept while the machine stays warm) for the final summary.
#
#   bash scripts/gpu_check.sh stage1|stage2|stage3|summary
#   GPU_CHECK_DRY=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh stage2   # the plumbing on a CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STAGE=${1:-}
case "$STAGE" in stage1|stage2|stage3|summary) ;; *) echo "usage: bash scripts/gpu_check.sh stage1|stage2|stage3|summary" >&2; exit 2;; esac
STATE=${GPU_CHECK_STATE:-/tmp/orchmoe-gpu}
OUT=${OUT:-$REPO/runs/gpu-check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-570}  # seconds this command may use (the device tool stops a command at 600)
DRY=${GPU_CHECK_DRY:-0}
BUNDLE=$REPO/.gpu
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
RESULTS=$STATE/results
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$OUT/$STAGE.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log is complete before the tool collects $OUT
START=$SECONDS

say() { printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# bounded CAP RESERVE CMD...: run CMD for at most CAP s and never into the last RESERVE s of the budget.
bounded() {
  local cap=$1 reserve=$2 t; shift 2
  t=$(( $(left) - reserve )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then say "skipped (no time left in this call): $*"; return 124; fi
  say "(<= ${t}s) $*"
  timeout -k 15 "$t" "$@"
}

setup() {
  if [ ! -d "$BUNDLE/common/wheels" ]; then
    echo "error: $BUNDLE/common is missing: run scripts/gpu_bundle.sh here first and carry .gpu/common in every call" >&2
    exit 2
  fi
  if [ ! -f "$STATE/site/.installed" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
      "$BUNDLE"/common/wheels/*.whl || { echo "error: installing the carried wheels failed" >&2; exit 2; }
    touch "$STATE/site/.installed"
  fi
  export PYTHONPATH="$STATE/site:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  export ORCHMOE_CACHE=$STATE/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
  "$PY" - "$OUT/env.json,$RESULTS/env.json" "$DEVICE" <<'EOF' || exit 2
import importlib, json, platform, sys
import torch
from importlib.metadata import version
names = ("torch", "transformers", "peft", "accelerate", "safetensors", "pyyaml", "tqdm", "rouge-score", "nltk", "gguf")
versions = {n: version(n) for n in names}
for module in ("transformers", "peft", "accelerate", "safetensors", "yaml", "tqdm", "rouge_score.rouge_scorer", "nltk", "gguf"):
    importlib.import_module(module)  # what orchmoe and the benchmarks import
versions["orchmoe"] = importlib.import_module("orchmoe").__version__
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), **versions, "cuda": cuda,
       "device": torch.cuda.get_device_name() if cuda else "cpu", "cuda_version": torch.version.cuda}
for path in sys.argv[1].split(","):
    open(path, "w").write(json.dumps(env, indent=2) + "\n")
print(" | ".join(f"{k} {v}" for k, v in env.items()))
if sys.argv[2] == "cuda" and not cuda:
    sys.exit("error: no CUDA device (torch.cuda.is_available() is False); GPU_CHECK_DRY=1 tests the plumbing on a CPU")
EOF
}

# check PIECE FILE: the file's SHA-256 is the manifest's for PIECE (a path under .gpu/, or "gguf").
check() {
  local want got
  want=$("$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); k=sys.argv[2]; print((m['gguf'] if k=='gguf' else m['pieces'][k])['sha256'])" \
    "$BUNDLE/common/MANIFEST.json" "$1") || return 1
  got=$(sha256sum "$2" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "error: $2: SHA-256 $got, the manifest says $want for $1" >&2; return 1; }
}

# -- stage 1 -------------------------------------------------------------------------------------------------

keep_first_half() {
  local piece=call1/$GGUF_NAME.part1
  if [ -f "$BUNDLE/$piece" ]; then
    check "$piece" "$BUNDLE/$piece" && cp "$BUNDLE/$piece" "$STATE/" && say "kept the model's first half in $STATE"
  else
    say "warning: $BUNDLE/$piece not carried: stage2 will have no model (carry .gpu/call1 in this call)"
  fi
}

run_tests() {
  bounded 420 "${1:-60}" "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider --junitxml="$RESULTS/tests.xml" \
    tests/test_cuda.py
  local rc=$?
  cp "$RESULTS/tests.xml" "$OUT/" 2>/dev/null
  say "tests/test_cuda.py exit code $rc"
}

# -- stage 2 -------------------------------------------------------------------------------------------------

# The model: the two halves joined, checked, converted once by orchmoe.loading (as on a CPU); prints its folder.
stage_model() {
  local gguf=$STATE/$GGUF_NAME
  if [ ! -f "$gguf" ]; then
    [ -f "$STATE/$GGUF_NAME.part1" ] || { say "COLD: $STATE holds no model half (the machine was given back after stage1)"; return 1; }
    [ -f "$BUNDLE/call2/$GGUF_NAME.part2" ] || { say "error: .gpu/call2 not carried"; return 1; }
    check "call2/$GGUF_NAME.part2" "$BUNDLE/call2/$GGUF_NAME.part2" || return 1
    cat "$STATE/$GGUF_NAME.part1" "$BUNDLE/call2/$GGUF_NAME.part2" > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
    check gguf "$gguf" || { rm -f "$gguf"; return 1; }
  fi
  "$PY" - "$gguf" "$STATE/model_dir" <<'EOF' || return 1
import sys
from pathlib import Path
from orchmoe.loading import load_model_and_tokenizer
model, tok, info = load_model_and_tokenizer(sys.argv[1])  # converts once into $ORCHMOE_CACHE/models
Path(sys.argv[2]).write_text(info["source"])
print(f"model {info['name']} ready in {info['source']} ({sum(p.numel() for p in model.parameters()):,} parameters)")
EOF
}

stage_data() {
  [ -d "$STATE/superni/tasks" ] && return 0
  local piece=call2/superni.tar.xz
  [ -f "$BUNDLE/$piece" ] || { say "error: $BUNDLE/$piece not carried"; return 1; }
  check "$piece" "$BUNDLE/$piece" && tar -C "$STATE" -xJf "$BUNDLE/$piece" && say "SuperNI unpacked: $(ls "$STATE/superni/tasks" | wc -l) tasks"
}

run_quality() {
  [ -f "$STATE/model_dir" ] && [ -d "$STATE/superni/tasks" ] || { say "quality: no model or data staged; skipped"; return 1; }
  local args=(--size ni100-quick --methods lora,poly,mhr,orchmoe --seeds 0)
  [ "$DRY" = 1 ] && args=(--size cpu --methods lora --seeds 0 --max-steps 2 --train-per-task 4 --eval-per-task 1
                          --unseen-tasks 1 --unseen-per-task 1 --max-new-tokens 4)
  bounded 3600 "${1:-20}" "$PY" benchmarks/quality.py "${args[@]}" --model "$(cat "$STATE/model_dir")" \
    --data "$STATE/superni" --out "$STATE/quality"
  say "quality exit code $? (124: the call's time ran out; the next stage resumes it)"
  cp "$STATE/quality/quality.md" "$OUT/" 2>/dev/null
  cp "$STATE/quality/quality.md" "$RESULTS/" 2>/dev/null
  return 0
}

# -- stage 3 -------------------------------------------------------------------------------------------------

run_speed() {
  local shape=$1 batch=$2 json=$RESULTS/speed-$1.json
  [ -f "$json" ] && { say "speed $shape: done in an earlier call"; return 0; }
  local args=(--device cuda --dtype bf16 --autocast --shape "$shape" --batch "$batch" --seq 512 --steps 10 --warmup 2
              --gen-batch 16 --prompt-len 128 --new-tokens 64 --gen-reps 3 --decode-reps 2)
  [ "$DRY" = 1 ] && args=(--device cpu --shape tiny --threads 1 --batch 2 --seq 32 --steps 3 --gen-reps 1
                          --new-tokens 4 --prompt-len 16 --decode-reps 1 --no-memory)
  bounded 300 "${3:-60}" "$PY" benchmarks/speed.py "${args[@]}" --check molora,poly,mhr,mode,orchmoe \
    --train-limit 1.15 --limit 1.10 --mem-limit 1.10 --vs-peft --json "$json.tmp"
  [ -f "$json.tmp" ] && mv "$json.tmp" "$json" && cp "$json" "$OUT/"
}

run_serving() {
  local json=$RESULTS/serving.json model=(--shape smollm2-135m)
  [ -f "$json" ] && { say "serving: done in an earlier call"; return 0; }
  [ -f "$STATE/model_dir" ] && model=(--model "$(cat "$STATE/model_dir")")
  local args=(--device cuda --dtype bf16 --autocast "${model[@]}" --n-tasks 64 --prompt-len 128 --new-tokens 32 --reps 3)
  [ "$DRY" = 1 ] && args=(--device cpu --shape tiny --threads 1 --n-tasks 4 --prompt-len 16 --new-tokens 4 --reps 1)
  bounded 300 "${1:-60}" "$PY" benchmarks/serving.py "${args[@]}" --methods poly,mhr,orchmoe --json "$json.tmp"
  [ -f "$json.tmp" ] && mv "$json.tmp" "$json" && cp "$json" "$OUT/"
}

summary() {
  "$PY" scripts/gpu_summary.py "$RESULTS" "$STATE/quality" --out "$OUT/summary.md" --json "$RESULTS/summary.json"
  cp "$OUT/summary.md" "$RESULTS/" 2>/dev/null
}

say "gpu_check $STAGE (state $STATE, results $OUT, budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN on a CPU'))"
case "$STAGE" in
  stage1)
    setup
    keep_first_half
    run_tests 180
    run_speed smollm2-135m 16 15
    say "stage1 done: make the stage2 call NOW (the model's first half lives only while this machine is warm)"
    ;;
  stage2)
    setup
    if stage_model && stage_data; then
      run_quality 20
    else
      say "no model: measuring speed and serving in this call instead; repeat stage1 + stage2 back to back for quality"
      run_speed smollm2-135m 16 200
      run_speed 1.3b 8 100
      run_serving 20
    fi
    ;;
  stage3)
    setup
    run_speed smollm2-135m 16 330
    run_speed 1.3b 8 200
    run_serving 60
    [ -f "$STATE/model_dir" ] && run_quality 45
    summary
    ;;
  summary)
    setup
    summary
    ;;
esac
say "gpu_check $STAGE finished after $((SECONDS - START)) s"
