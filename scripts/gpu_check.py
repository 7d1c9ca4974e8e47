"""The GPU check's driver: one device-tool call's work inside its time budget, then summary.md and check.json.

scripts/gpu_check.sh (on the GPU machine, from the repository root) installs the carried wheels and runs

    python scripts/gpu_check.py quick|quality|stage --budget SECONDS --state DIR --out DIR [--dry]

Why a budget: the GPU machine is lent for 15 minutes in all (its start and idle time included) and one
command for 10. Every step gets at most its cap and never more than what is left of the budget less a
reserve for writing the results; a step that cannot get its minimum is recorded as "not run" with the
reason, never dropped; a step that overruns is stopped (its whole process group) and recorded as timed out.

Modes: ``quick`` (environment, speed of every method vs our LoRA and PEFT's LoRA at the SmolLM2-135M shape,
the 64-task serving batch vs PEFT's mixed-adapter batch, tests/test_cuda.py, speed at a 1.3B shape if time
is left; it also keeps the model's first part on the machine), ``quality`` (the real model joined, converted
and checked, the reduced quality protocols of scripts/gpu_check.yaml, then benchmarks/serve_vs_peft.py on
the real model and prompts when that script is there; it stops at once when a piece is missing), ``stage`` (keep the model's
first part and stop: the first of two calls for a quality-only lease). ``--dry`` runs the same plumbing on
a CPU at tiny sizes (scripts/gpu_dry_run.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_quality  # noqa: E402
import gpu_summary  # noqa: E402
from gpu_steps import REPO, Budget, Ctx, Step, outcome, read_json, run_cmd, run_step, write_json  # noqa: E402

MAX_BUDGET = 570  # the device tool stops a command at 600 s
# Defaults that leave the pair inside one 15-minute lease: start ~1.5 min + quick 6.5 + the turn between
# the calls + quality 5.5, with a minute to spare.
DEFAULT_BUDGET = {"quick": 390, "quality": 330, "stage": 60}


# -- steps of every mode -------------------------------------------------------------------------------------

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface_hub")
PACKAGES += ("numpy", "pyyaml", "rouge-score", "nltk", "gguf", "pytest", "datasets", "trl")
MODULES = ("transformers", "peft", "accelerate", "safetensors", "yaml", "rouge_score.rouge_scorer", "nltk", "gguf")


def step_env(ctx: Ctx, seconds: int) -> dict:
    """Versions, device, what imports; without CUDA (and not --dry) nothing else is worth running."""
    import importlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "versions": {n: ver(n) for n in PACKAGES}}
    env["import_errors"] = {}
    for module in (*MODULES, "orchmoe"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            env["import_errors"][module] = f"{type(e).__name__}: {e}"
    cuda = torch.cuda.is_available()
    env.update(cuda=cuda, device=torch.cuda.get_device_name() if cuda else "cpu", cuda_version=torch.version.cuda)
    if cuda:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["dry"], env["budget_s"] = ctx.dry, ctx.budget.total
    print(json.dumps(env, indent=1), flush=True)
    if not cuda and not ctx.dry:
        ctx.stop = "no CUDA device (torch.cuda.is_available() is False)"
        return {"status": "failed", "reason": ctx.stop, "data": env}
    if env["import_errors"]:
        return {"status": "failed", "reason": f"cannot import {sorted(env['import_errors'])}", "data": env}
    return {"status": "ok", "data": env}


def step_stage(ctx: Ctx, seconds: int) -> dict:
    """Keep the model's first part (checked) in the state folder, where a quality call on this machine finds it."""
    return gpu_quality.keep_part(ctx.bundle, gpu_quality.PART1, ctx.state)


# -- quick -----------------------------------------------------------------------------------------------------


def step_tests(ctx: Ctx, seconds: int) -> dict:
    """tests/test_cuda.py with a per-test time limit; its JUnit XML comes back too."""
    xml = ctx.state / "tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [ctx.python, "-m", "pytest", "-q", "-rs", "--durations=8", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}", "tests/test_cuda.py"]
    # every test has 120 s, and the tests stop (skipping what is left) 20 s before the step's time is up, so
    # pytest always ends by itself and writes its report
    env = {"ORCHMOE_TEST_TIMEOUT": "120", "ORCHMOE_TEST_DEADLINE": str(time.time() + seconds - 20)}
    env.update({"GPU_CHECK_DRY": "1"} if ctx.dry else {})
    rc, timed_out = run_cmd(cmd, seconds, env)
    data = gpu_summary.junit_counts(xml) if xml.is_file() else None
    if xml.is_file():
        (ctx.out / "tests.xml").write_bytes(xml.read_bytes())
    if timed_out:
        return {"status": "timed out", "reason": f"stopped after {seconds} s", "rc": rc, "data": data}
    if data is None:
        return {"status": "failed", "reason": f"exit code {rc}, no JUnit XML", "rc": rc}
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "data": data}


SPEED_ARGS = {
    "smollm2-135m": "--shape smollm2-135m --batch 16 --seq 512 --steps 10 --warmup 2 --gen-batch 16 --prompt-len 128 "
    "--new-tokens 32 --gen-reps 2 --decode-reps 2",
    "1.3b": "--shape 1.3b --batch 8 --seq 512 --steps 5 --warmup 1 --gen-batch 16 --prompt-len 128 --new-tokens 32 "
    "--gen-reps 1 --decode-reps 1",
}
SPEED_DRY = "--shape tiny --threads 1 --batch 2 --seq 32 --steps 2 --gen-batch 2 --gen-reps 1 --new-tokens 4 "
SPEED_DRY += "--prompt-len 16 --decode-reps 1 --no-memory"
SPEED_TARGETS = "--check molora,poly,mhr,mode,orchmoe --train-limit 1.15 --limit 1.10 --mem-limit 1.10 --vs-peft"


def speed_step(shape: str) -> Callable[[Ctx, int], dict]:
    """benchmarks/speed.py at ``shape`` (random weights), bf16, every method vs our LoRA and PEFT's."""

    def run(ctx: Ctx, seconds: int) -> dict:
        if ctx.dry and shape != "smollm2-135m":
            return {"status": "not run", "reason": "dry run: the same tiny run as the first speed step"}
        json_path = ctx.state / f"speed-{shape}.json"
        json_path.unlink(missing_ok=True)
        args = SPEED_DRY if ctx.dry else "--device cuda --dtype bf16 --autocast " + SPEED_ARGS[shape]
        cmd = [ctx.python, "benchmarks/speed.py", *args.split(), *SPEED_TARGETS.split(), "--json", str(json_path)]
        rc, timed_out = run_cmd(cmd, seconds)
        return outcome(rc, timed_out, seconds, read_json(json_path))

    return run


def step_serving(ctx: Ctx, seconds: int) -> dict:
    """benchmarks/serving.py: 64 prompts of 64 tasks in one batch vs PEFT's mixed-adapter batch."""
    json_path = ctx.state / "serving.json"
    json_path.unlink(missing_ok=True)
    # Poly (routed by task id) and OrchMoE (by prompt); MHR is Poly with split heads. 2 timed reps: PEFT's
    # mixed batch of 64 adapters loops over 64 sub-batches in each of 60 layers at every step.
    args = "--device cuda --dtype bf16 --autocast --shape smollm2-135m --n-tasks 64 --prompt-len 128 --new-tokens 32"
    args += " --reps 2"
    if ctx.dry:
        args = "--device cpu --shape tiny --threads 1 --n-tasks 4 --prompt-len 16 --new-tokens 4 --reps 1"
    cmd = [ctx.python, "benchmarks/serving.py", *args.split(), "--methods", "poly,orchmoe", "--json", str(json_path)]
    rc, timed_out = run_cmd(cmd, seconds)
    return outcome(rc, timed_out, seconds, read_json(json_path))


def step_quality_in_quick(ctx: Ctx, seconds: int) -> dict:
    return {
        "status": "not run",
        "reason": "the real model (93.8 MiB as GGUF) does not fit one call: this call carried its first part and "
        "kept it; `bash scripts/gpu_check.sh quality` (next, on this warm machine) carries the second part and runs it",
    }


# The performance table first (what the lease is for), then the tests, then what is left over.
QUICK = [
    Step("stage", "keep the model's first part for the quality call", 30, 1, step_stage),
    Step("speed-smollm2-135m", "speed at the SmolLM2-135M shape, bf16", 180, 60, speed_step("smollm2-135m")),
    Step("serving", "serving: 64 tasks in one batch vs PEFT's mixed-adapter batch", 180, 60, step_serving),
    Step("tests", "tests/test_cuda.py", 180, 60, step_tests),
    Step("quality", "quality", 1, 0, step_quality_in_quick),
    Step("speed-1.3b", "speed at a 1.3B shape, bf16 (if time is left)", 150, 90, speed_step("1.3b")),
]


def steps_for(mode: str, ctx: Ctx) -> list[Step]:
    first = [Step("env", "environment", 60, 5, step_env)]
    if mode == "quick":
        return first + QUICK
    if mode == "stage":
        return [QUICK[0]]
    return first + gpu_quality.steps(ctx, Step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("quick", "quality", "stage"))
    ap.add_argument("--budget", type=float, default=None, help="seconds this call may use (default by mode)")
    ap.add_argument("--start", type=float, default=None, help="wall-clock start of the call (default: now)")
    ap.add_argument("--state", type=Path, required=True, help="kept while the machine is warm")
    ap.add_argument("--out", type=Path, required=True, help="what comes back ($OUT)")
    ap.add_argument("--bundle", type=Path, default=REPO / ".gpu", help="the carried pieces")
    ap.add_argument("--dry", action="store_true", help="on a CPU at tiny sizes: the plumbing only")
    args = ap.parse_args(argv)
    budget = args.budget or DEFAULT_BUDGET[args.mode]
    if budget > MAX_BUDGET:
        print(f"budget {budget:.0f} s is over {MAX_BUDGET} s (the tool stops a command at 600 s): using {MAX_BUDGET}")
        budget = MAX_BUDGET
    for d in (args.state, args.out):
        d.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.mode, args.dry, args.state, args.out, args.bundle, Budget(budget, args.start or time.time()))
    if args.mode == "quality" and (missing := gpu_quality.missing_pieces(ctx)):
        print(f"gpu_check quality: cannot run, {'; '.join(missing)}", flush=True)
        ctx.records.append({"key": "pieces", "title": "pieces", "status": "failed", "reason": "; ".join(missing)})
        finish(ctx)
        return 3
    for step in steps_for(args.mode, ctx):
        run_step(ctx, step)
    finish(ctx)
    bad = [r["key"] for r in ctx.records if r["status"] in ("failed", "timed out")]
    return 1 if bad else 0


def finish(ctx: Ctx) -> None:
    """check.json (every record, raw data included) and summary.md, in $OUT and the state folder."""
    check = {
        "mode": ctx.mode,
        "dry": ctx.dry,
        "budget_s": ctx.budget.total,
        "elapsed_s": round(ctx.budget.total - ctx.budget.left(), 1),
        "steps": ctx.records,
    }
    page = gpu_summary.render(check)
    write_json(ctx.out / "check.json", check)
    (ctx.out / "summary.md").write_text(page)
    write_json(ctx.state / f"check-{ctx.mode}.json", check)  # for a later call on this machine
    print("\n" + page, flush=True)


if __name__ == "__main__":
    sys.exit(main())
