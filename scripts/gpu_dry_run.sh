#!/usr/bin/env bash
# The GPU check's dry run: its plumbing proven on this CPU machine, at tiny sizes, in a venv with the GPU
# image's versions (scripts/gpu_image.txt: transformers 5.17.0, accelerate 1.15.0, ..., and no datasets,
# dill, multiprocess, rouge-score, nltk, gguf, trl, peft: only what the bundle carries). Run by .ci/run.
#
#   quick          tests/test_cuda.py (its device-agnostic tests on the CPU), speed and serving at a tiny
#                  shape, the serve_vs_peft hook, the summary; keeps the model's first part
#   quality        joins the real model's parts, converts it with transformers 5.17 and checks its end and
#                  pad tokens, the quality protocols with tiny options (real model, 2 steps)
#   quality again  on a fresh state: must stop at once, naming the missing part
#
# The venv is made once under .cache/gpu-dry (ignored) and rebuilt when scripts/gpu_image.txt changes; the
# bundle (scripts/gpu_bundle.sh) is reused. Needs PyPI the first time. ~2-4 min after that.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.cache/gpu-dry
VENV=$ROOT/venv
START=$SECONDS

stamp=$(sha256sum scripts/gpu_image.txt | cut -c1-16)
if [ "$(cat "$VENV/.image" 2>/dev/null)" != "$stamp" ]; then
  echo "== dry run: making $VENV (the GPU image's versions; once)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r scripts/gpu_image.txt 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  echo "$stamp" > "$VENV/.image"
fi
"$VENV/bin/python" - <<'EOF'
import importlib.util, sys
present = [m for m in ("datasets", "dill", "multiprocess", "rouge_score", "nltk", "gguf", "trl", "peft")
           if importlib.util.find_spec(m)]
if present:
    sys.exit(f"dry run: the venv has {present}, which the GPU image lacks")
EOF
bash scripts/gpu_bundle.sh | sed -n '/^pieces/,/^call quality/p'

STATE=$ROOT/state
rm -rf "$STATE" "$ROOT/fresh" "$ROOT"/out-* "$ROOT"/carry-*
for call in quick quality; do  # what each call carries, and nothing else, as on the GPU machine
  mkdir -p "$ROOT/carry-$call"
  ln -s "$PWD/.gpu/common" "$PWD/.gpu/$call" "$ROOT/carry-$call/"
done
run() {  # MODE STATE OUT
  GPU_CHECK_DRY=1 PYTHON="$VENV/bin/python" GPU_CHECK_STATE=$2 OUT=$3 GPU_CHECK_BUNDLE="$PWD/$ROOT/carry-$1" \
    bash scripts/gpu_check.sh "$1" > "$3.txt" 2>&1
}
echo "== dry run: quick"
run quick "$STATE" "$ROOT/out-quick" || true
echo "== dry run: quality (on the same state: the warm machine)"
run quality "$STATE" "$ROOT/out-quality" || true
echo "== dry run: quality on a fresh machine (must stop at once)"
t0=$SECONDS
if run quality "$ROOT/fresh" "$ROOT/out-fresh"; then
  echo "dry run: quality on a fresh state did not stop" >&2; exit 1
fi
grep -q "first part is not on this machine" "$ROOT/out-fresh/quality.log" \
  || { echo "dry run: quality on a fresh state did not say why it stopped" >&2; tail -5 "$ROOT/out-fresh/quality.log"; exit 1; }
[ $((SECONDS - t0)) -lt 60 ] || { echo "dry run: quality on a fresh state took $((SECONDS - t0)) s to stop" >&2; exit 1; }

if ! "$VENV/bin/python" scripts/gpu_dry_verify.py quick "$ROOT/out-quick" quality "$ROOT/out-quality"; then
  for m in quick quality; do echo "---- $m (last lines)"; tail -40 "$ROOT/out-$m/$m.log"; done
  exit 1
fi
echo "== dry run done in $((SECONDS - START)) s (summaries: $ROOT/out-quick/summary.md, $ROOT/out-quality/summary.md)"
