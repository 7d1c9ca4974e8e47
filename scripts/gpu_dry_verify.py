"""Checks what a dry run of the GPU check left (scripts/gpu_dry_run.sh): every step ran, or did not run for
an expected reason; $OUT holds what the device tool would bring back; the model check passed.

    python scripts/gpu_dry_verify.py quick OUT_QUICK quality OUT_QUALITY
Exit code 1 with one line per problem.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Steps that a dry run cannot run, and the start of the reason they give.
EXPECTED_NOT_RUN = {
    "quality": "the real model",  # quick: the model's second part travels with the quality call
    "serve-vs-peft": "script missing",  # until benchmarks/serve_vs_peft.py lands (export branch)
    "speed-1.3b": "dry run",
}
# The device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'.
MAX_FILES, NAME = 8, re.compile(r"^[A-Za-z0-9._-]+$")


def problems(mode: str, out: Path) -> list[str]:
    """What is wrong with one call's $OUT (empty: nothing)."""
    found = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES or any(not NAME.match(p.name) for p in files):
        found.append(f"{out}: {len(files)} files ({[p.name for p in files]}); the tool brings back {MAX_FILES}")
    for name in ("summary.md", "check.json", f"{mode}.log"):
        if not (out / name).is_file():
            found.append(f"{out}: no {name}")
    if found:
        return found
    check = json.loads((out / "check.json").read_text())
    for step in check["steps"]:
        status, reason = step["status"], step.get("reason", "")
        if status == "not run" and reason.startswith(EXPECTED_NOT_RUN.get(step["key"], "\0")):
            continue
        if status != "ok":
            found.append(f"{mode}: step {step['key']} {status}: {reason}")
    keys = {s["key"] for s in check["steps"]}
    want = {"quick": {"env", "stage", "tests", "speed-smollm2-135m", "serving"}, "quality": {"env", "model", "data"}}
    if missing := want.get(mode, set()) - keys:
        found.append(f"{mode}: steps {sorted(missing)} missing from check.json")
    tests = next((s.get("data") for s in check["steps"] if s["key"] == "tests"), None)
    if mode == "quick" and (not tests or tests["passed"] == 0 or tests["failures"] or tests["errors"]):
        found.append(f"quick: tests/test_cuda.py on the CPU: {tests}")
    model = next((s.get("data") for s in check["steps"] if s["key"] == "model"), None)
    if mode == "quality" and (not model or model["eos_token"] != "<|im_end|>" or not model["ok"]):
        found.append(f"quality: the converted model's special tokens: {model}")
    runs = [s for s in check["steps"] if s["key"].startswith("quality-")]
    if mode == "quality" and (not runs or any(s["status"] != "ok" for s in runs)):
        found.append(f"quality: runs {[(s['key'], s['status']) for s in runs]}")
    if "## Steps" not in (out / "summary.md").read_text():
        found.append(f"{out}/summary.md has no steps table")
    return found


def main(argv: list[str]) -> int:
    pairs = list(zip(argv[::2], argv[1::2]))
    found = [p for mode, out in pairs for p in problems(mode, Path(out))]
    for p in found:
        print(f"dry run: {p}")
    print(f"dry run: {'FAILED' if found else 'OK'} ({', '.join(m for m, _ in pairs)})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
