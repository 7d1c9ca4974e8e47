"""The GPU check's parts that need no GPU: the time budget, bounded subprocesses, the summary page, the
`orchmoe train` runs of scripts/gpu_check.yaml, and the quality call's refusal when a piece is missing.
(The whole check runs on the CPU in scripts/gpu_dry_run.sh, from .ci/run.)"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_quality  # noqa: E402
import gpu_summary  # noqa: E402
import gpu_train  # noqa: E402
from gpu_steps import Budget, Ctx, Step, run_cmd, run_step  # noqa: E402

import quality  # noqa: E402  (benchmarks/quality.py)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ctx_with(tmp_path: Path, total: float, clock=None) -> Ctx:
    budget = Budget(total, start=(clock or time.time)(), reserve=10, clock=clock or time.time)
    return Ctx("quick", True, tmp_path / "state", tmp_path / "out", tmp_path / "bundle", budget)


def test_a_step_gets_its_cap_or_what_is_left_and_else_is_reported_not_run(tmp_path):
    clock = Clock()
    ctx = ctx_with(tmp_path, 100, clock)
    assert ctx.budget.grant(cap=50, need=10) == 50
    clock.now += 60  # 40 s left, 10 reserved
    assert ctx.budget.grant(cap=50, need=10) == 30
    granted = []
    record = run_step(ctx, Step("a", "step a", 50, 10, lambda c, s: granted.append(s) or {"status": "ok"}))
    assert granted == [30] and record["status"] == "ok"
    clock.now += 25  # 15 s left: 5 after the reserve, under the need
    record = run_step(ctx, Step("b", "step b", 50, 10, lambda c, s: pytest.fail("must not run")))
    assert record["status"] == "not run" and "5 s of the call's budget, this needs ~10 s" in record["reason"]
    boom = run_step(ctx_with(tmp_path, 100), Step("c", "step c", 50, 1, lambda c, s: 1 / 0))
    assert boom["status"] == "failed" and "ZeroDivisionError" in boom["reason"]
    stopped = ctx_with(tmp_path, 100)
    stopped.stop = "no CUDA device"
    assert run_step(stopped, Step("d", "step d", 5, 0, lambda c, s: {"status": "ok"}))["reason"] == "no CUDA device"


def test_a_command_past_its_time_is_ended_with_its_children(tmp_path):
    t0 = time.time()
    log = tmp_path / "log"
    rc, timed_out = run_cmd(["sh", "-c", "echo started; sleep 60 & sleep 60"], 1, log=log)
    assert timed_out and time.time() - t0 < 15
    assert log.read_text().startswith("started")
    assert run_cmd([sys.executable, "-c", "raise SystemExit(3)"], 30) == (3, False)


def speed_data() -> dict:
    row = {
        "label": "LoRA r=8", "params": 460800, "train_tok_s": 1e5, "train_vs_lora": 1.0, "train_vs_lora_paired": 1.0,
        "train_vs_peft_lora": 0.9, "gen_tok_s": 2e3, "gen_vs_lora": 1.0, "gen_vs_peft_lora": 0.95, "decode_ms": 12.5,
        "decode_vs_lora_paired": 1.0, "peak_mb": 800.0, "same_as_base": True,
    }  # fmt: skip
    meta = {
        "model": "smollm2-135m",
        "hardware": "GPU",
        "dtype": "bf16",
        "autocast": True,
        "train": "t",
        "generate": "g",
    }
    targets = [{"target": "orchmoe: training step <= 1.15x LoRA's", "pass": False, "value": 1.3}]
    rows = [{**row, "method": "lora"}, {**row, "method": "peft-lora", "label": "PEFT LoRA", "peak_mb": 1000.0}]
    return {"meta": meta, "results": rows, "targets": targets}


def test_the_summary_shows_every_step_its_targets_and_why_a_step_did_not_run():
    check = {"mode": "quick", "dry": False, "budget_s": 420, "elapsed_s": 400.2, "steps": [
        {"key": "env", "title": "environment", "status": "ok", "seconds": 3,
         "data": {"device": "NVIDIA H100", "versions": {"torch": "2.11.0", "transformers": "5.17.0"}}},
        {"key": "speed-smollm2-135m", "title": "speed at the SmolLM2-135M shape", "status": "ok", "data": speed_data()},
        {"key": "serve-vs-peft", "title": "serve_vs_peft", "status": "not run", "reason": "script missing: x"},
        {"key": "speed-1.3b", "title": "speed 1.3b", "status": "not run", "reason": "no time left: 12 s"},
    ]}  # fmt: skip
    page = gpu_summary.render(check)
    assert "device NVIDIA H100 | torch 2.11.0 | transformers 5.17.0" in page
    assert "| serve_vs_peft | not run | - | script missing: x |" in page
    assert "| speed 1.3b | not run | - | no time left: 12 s |" in page
    assert "| orchmoe: training step <= 1.15x LoRA's | 1.300 | FAIL |" in page and "0 of 1 targets pass" in page
    lora = next(line for line in page.splitlines() if line.startswith("| LoRA r=8 |"))
    assert "| 800 | 1.000x | 0.800x |" in lora  # peak memory vs our LoRA and vs PEFT's


def test_junit_counts_name_the_failed_tests(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase name="ok"/><testcase name="bad"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase name="skip"><skipped/></testcase></testsuite></testsuites>'
    )
    counts = gpu_summary.junit_counts(xml)
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed"] == [{"test": "bad", "message": "assert 1 == 2"}]


def parsed(argv: list[str]):
    """`orchmoe train`'s parse of ``argv`` (the model and data are not read)."""
    from orchmoe.recipe.parse import parse_train_args

    return parse_train_args(argv)


def test_train_argv_spells_flags_lists_and_values():
    argv = gpu_train.train_argv({"tasks": ["a", "b"], "progress": False, "eval": True, "lr": 0.001, "x": None})
    assert argv == ["--tasks", "a,b", "--no-progress", "--eval", "--lr", "0.001"]
    cmd = gpu_train.train_command("py", {"lr": 1}, prelude="import torch")
    assert cmd[:2] == ["py", "-c"] and cmd[2].startswith("import torch\n") and cmd[3:] == ["train", "--lr", "1"]


@pytest.mark.parametrize("dry", [False, True])
def test_every_train_run_of_the_gpu_check_is_valid_orchmoe_train_options(dry):
    config = gpu_train.load_config()
    common = {"model": "m", "data": "d", "out": "o", "seed": 0}
    parsed(gpu_train.train_argv({**common, **gpu_train.cuda_test_options(config, dry=dry)}))
    runs = gpu_train.quality_runs(config, dry=dry)
    assert [(p, m) for p, m, _ in runs] == [(p, m) for p in config["quality"]["protocols"] for m in ("lora", "orchmoe")]
    for _, _, options in runs:
        parsed(gpu_train.train_argv({**common, **options}))


def test_the_gpu_quality_runs_are_benchmarks_quality_adapters_and_cpu_protocol():
    """Same adapters as benchmarks/quality.py, and its `cpu` size: GPU and CPU figures are comparable."""
    config = gpu_train.load_config()
    common = ["--model", "m", "--data", "d", "--out", "o"]
    for method, options in config["methods"].items():
        assert parsed([*common, *gpu_train.train_argv(options)]) == parsed([*common, *quality.METHOD_ARGS[method]])
    cpu = next(opts for p, m, opts in gpu_train.quality_runs(config) if p == "cpu" and m == "lora")
    ours = parsed([*common, *gpu_train.train_argv(cpu)])
    theirs = parsed([*common, *quality.METHOD_ARGS["lora"], *quality.SIZES["cpu"]["args"]])
    assert ours == theirs


def test_the_quality_call_stops_at_once_naming_what_is_missing(tmp_path, capsys):
    bundle = tmp_path / ".gpu"
    (bundle / "common").mkdir(parents=True)
    (bundle / "common" / "MANIFEST.json").write_text(json.dumps({"gguf": {}, "pieces": {}}))
    out = tmp_path / "out"
    argv = ["quality", "--state", str(tmp_path / "fresh"), "--out", str(out), "--bundle", str(bundle)]
    t0 = time.time()
    assert gpu_check.main(argv) == 3 and time.time() - t0 < 10
    said = capsys.readouterr().out
    assert "first part is not on this machine" in said and "carry .gpu/quality" in said
    check = json.loads((out / "check.json").read_text())
    assert check["steps"][0]["status"] == "failed" and "SuperNI was not carried" in check["steps"][0]["reason"]
    assert "first part is not on this machine" in (out / "summary.md").read_text()
    assert gpu_quality.missing_pieces(gpu_check.Ctx("quality", True, tmp_path, out, bundle, Budget(1, 0)))


def test_a_carried_part_is_kept_only_when_its_sha256_is_the_manifests(tmp_path):
    bundle, state = tmp_path / ".gpu", tmp_path / "state"
    part = bundle / gpu_quality.PART1
    part.parent.mkdir(parents=True)
    state.mkdir()
    part.write_bytes(b"the first part")
    (bundle / "common").mkdir()
    pieces = {gpu_quality.PART1: {"bytes": 14, "sha256": gpu_quality.sha256(part)}}
    (bundle / "common" / "MANIFEST.json").write_text(json.dumps({"gguf": {}, "pieces": pieces}))
    assert gpu_quality.keep_part(bundle, gpu_quality.PART1, state)["status"] == "ok"
    assert (state / part.name).read_bytes() == b"the first part"
    part.write_bytes(b"the first parT")  # one byte flipped on the way
    with pytest.raises(ValueError, match="SHA-256"):
        gpu_quality.keep_part(bundle, gpu_quality.PART1, state)
