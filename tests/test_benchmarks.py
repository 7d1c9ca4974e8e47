"""The benchmark scripts BENCHMARKS.md quotes run end to end, at toy sizes, and print what it quotes:
their tables, their targets and (quality) a summary over finished runs. Timings are not checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recipe_helpers import tiny_train_argv

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str, timeout: int = 600) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_ops_count_reports_no_host_sync_of_ours(tmp_path):
    out = _run(
        "ops_count.py", "--width", "64", "--vocab", "256", "--layers", "2", "--batch", "2", "--seq", "16",
        "--json", str(tmp_path / "ops.json"),
    )  # fmt: skip
    results = json.loads((tmp_path / "ops.json").read_text())["results"]
    assert {"lora", "molora", "poly", "mhr", "mode", "orchmoe"} <= set(results)
    for method, counts in results.items():
        for mode in ("train", "eval"):
            assert counts[mode]["syncs_ours"] == 0, (method, mode)
    assert results["orchmoe"]["train"]["ops"] > results["lora"]["train"]["ops"] > 0
    assert "| orchmoe |" in out


def test_layer_speed_prints_every_method_and_its_targets(tmp_path):
    out = _run(
        "layer_speed.py", "--shapes", "64x64", "--batch", "2", "--seq", "8", "--reps", "1", "--inner", "1",
        "--warmup", "0", "--inner-decode", "1", "--threads", "1", "--json", str(tmp_path / "layer.json"),
        "--limit", "1000", "--loop-speedup", "0",  # toy timings are noise
    )  # fmt: skip
    for name in ("plain:lora-8", "ours:orchmoe-4x2", "loop:molora-8x1", "peft:poly-4x2"):
        assert f"| {name} |" in out
    assert "## targets" in out and (tmp_path / "layer.json").is_file()


def test_speed_on_a_tiny_shape_checks_generation_against_the_base(tmp_path):
    out = _run(
        "speed.py", "--shape", "tiny", "--methods", "lora,orchmoe,peft-lora", "--steps", "1", "--warmup", "0",
        "--gen-reps", "1", "--decode-reps", "1", "--new-tokens", "4", "--prompt-len", "8", "--gen-batch", "2",
        "--batch", "2", "--seq", "16", "--no-memory", "--threads", "1", "--json", str(tmp_path / "speed.json"),
        "--limit", "1000",  # toy timings are noise: the targets' arithmetic is checked, not their figures
    )  # fmt: skip
    assert "| orchmoe 4x2 |" in out and "## targets" in out
    orch = next(line for line in out.splitlines() if line.startswith("| orchmoe 4x2 |"))
    assert "| yes |" in orch  # with every B = 0 the adapter reproduces the base model's tokens


def test_quality_runs_skip_finished_ones_and_summarise(shared_superni, tiny_llama, tmp_path):
    args = ["--size", "cpu", "--model", str(tiny_llama), "--methods", "lora,orchmoe", "--seeds", "0"]
    _run("quality.py", *args, "--out", str(tmp_path))
    table = (tmp_path / "quality.md").read_text()
    assert "| lora |" in table and "| orchmoe |" in table and "NMI" in table
    metrics = json.loads((tmp_path / "orchmoe-s0" / "metrics.json").read_text())
    assert metrics["seen"]["overall"]["n"] == 100  # 10 tasks x 10 held-out instances
    stamp = (tmp_path / "orchmoe-s0" / "metrics.json").stat().st_mtime_ns
    again = _run("quality.py", *args, "--out", str(tmp_path))  # finished: nothing is retrained
    assert (tmp_path / "orchmoe-s0" / "metrics.json").stat().st_mtime_ns == stamp
    assert "| orchmoe |" in again


def test_routing_control_reports_step_0_trained_and_frozen_runs(tiny_llama, superni, tmp_path):
    """The Task Router's NMI with the tasks before training, after, and with the allocation logits frozen."""
    from orchmoe.cli import main

    for name, extra in (("run", []), ("frozen", ["--router-lr", "0"])):
        assert main(tiny_train_argv(tiny_llama, superni, tmp_path / name, *extra, max_steps=3, eval=False)) == 0
    out = _run("routing_control.py", str(tmp_path / "run"), str(tmp_path / "frozen"), "--per-task", "4")
    rows = [line for line in out.splitlines() if line.startswith(("| run:", "| frozen:"))]
    assert [r.split("|")[1].strip() for r in rows] == [
        "run: step 0 (statistics only)",
        "run: trained",
        "frozen: trained (allocation logits frozen)",
    ]
    assert rows[0].split("|")[6].strip() == "0.000"  # before training every allocation is uniform
    assert rows[2].split("|")[6].strip() == "0.000"  # and frozen logits keep it so


def test_serve_load_measures_a_real_server_against_lone_generates(tiny_llama, superni, tmp_path):
    from orchmoe.cli import main

    assert main(tiny_train_argv(tiny_llama, superni, tmp_path / "orch", max_steps=1, eval=False)) == 0
    out = _run(
        "serve_load.py", str(tmp_path / "orch"), "--clients", "3", "--new-tokens", "4", "--reps", "1",
        "--ttft-reps", "1", "--json", str(tmp_path / "load.json"),
    )  # fmt: skip
    res = json.loads((tmp_path / "load.json").read_text())
    assert res["agreement"] == {"sequential": [3], "concurrent": [3]} and res["server_exit"] == 0
    assert "| 3 concurrent |" in out and "| peak RSS: server under load / lone generate |" in out
