"""The evidence scripts: unseen_eval.py (score finished adapters on every test-split task), paired_stats.py
(paired comparisons with a bootstrap CI and a sign test), keep_adapters.py (copies of finished runs) and the
planning and tables of ablations.py, at toy sizes (tiny model, the committed SuperNI excerpt)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from recipe_helpers import tiny_train_argv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablations  # noqa: E402
import keep_adapters  # noqa: E402
import paired_stats as ps  # noqa: E402
import unseen_eval  # noqa: E402
from orchmoe.data import load_task  # noqa: E402
from orchmoe.evaluation.metrics import score_example  # noqa: E402

TEST_TASKS = ["task1195_disflqa_disfluent_to_fluent_conversion", "task645_summarization"]  # the excerpt's test split


# ------------------------------------------------------------------------------------------------
# paired_stats on synthetic scores whose answer is known


def _scores(diff_fn, seeds=5, tasks=3, n=20, rng_seed=0) -> ps.Scores:
    """lora scores uniform in [0, 100]; orchmoe = lora + diff_fn(seed, task, instance noise)."""
    rng = np.random.default_rng(rng_seed)
    out: ps.Scores = {"lora": {}, "orchmoe": {}}
    for s in range(seeds):
        for t in range(tasks):
            base = rng.uniform(0, 100, n)
            d = diff_fn(s, t, rng.normal(0, 10, n))
            out["lora"].setdefault(s, {})[f"t{t}"] = {f"i{i}": float(base[i]) for i in range(n)}
            out["orchmoe"].setdefault(s, {})[f"t{t}"] = {f"i{i}": float(base[i] + d[i]) for i in range(n)}
    return out


def test_a_constant_shift_is_resolved_with_its_size():
    rows = ps.compare(_scores(lambda s, t, noise: np.full(20, 2.0)), "orchmoe", "lora", n_boot=500)
    overall = rows[-1]
    assert overall["task"] == ps.OVERALL and overall["n_instances"] == 60 and overall["n_seeds"] == 5
    assert overall["mean"] == pytest.approx(2.0) and overall["lo"] == pytest.approx(2.0)
    assert overall["resolved"] and (overall["above"], overall["below"]) == (5, 0)
    assert overall["p"] == pytest.approx(2 / 32)  # the smallest a 5-seed sign test can give
    assert all(r["resolved"] for r in rows)
    text = ps.sentence(overall)
    assert "resolved: the interval and the t-interval over the seed means (+2.00 to +2.00) exclude 0" in text
    one_seed = ps.compare(_scores(lambda s, t, noise: np.full(20, 2.0), seeds=1), "orchmoe", "lora", n_boot=200)[-1]
    assert one_seed["boot_resolved"] and not one_seed["resolved"]  # one seed says nothing about the others
    assert "no (1 seed)" in ps.comparison_table([one_seed])


def test_pure_noise_is_not_resolved():
    rows = ps.compare(_scores(lambda s, t, noise: noise, rng_seed=3), "orchmoe", "lora", n_boot=1000)
    assert not rows[-1]["resolved"] and rows[-1]["lo"] < 0 < rows[-1]["hi"]
    assert "not resolved: the interval includes 0" in ps.sentence(rows[-1])


def test_the_bootstrap_resamples_seeds_not_only_instances():
    """A difference that is exact on every instance but flips sign between seeds is not resolved: the seeds,
    not the 60 instances, are the replicates (a bootstrap over instances alone would call it resolved)."""
    shifts = [3.0, -1.0, 3.0]
    rows = ps.compare(_scores(lambda s, t, noise: np.full(20, shifts[s]), seeds=3), "orchmoe", "lora", n_boot=2000)
    overall = rows[-1]
    assert overall["mean"] == pytest.approx(5 / 3)
    assert overall["lo"] == pytest.approx(-1.0) and overall["hi"] == pytest.approx(3.0)
    assert not overall["resolved"] and (overall["above"], overall["below"]) == (2, 1)
    assert overall["t"][0] < -1.0  # the t-interval over three seed means is wider still


def test_a_bootstrap_interval_that_excludes_0_is_not_enough_when_the_seed_means_disagree():
    """Seed means +1, +2, +6: every resampled mean is positive, but three seeds this far apart do not pin the
    mean down (t-interval with 2 degrees of freedom), so the comparison is not called resolved."""
    shifts = [1.0, 2.0, 6.0]
    row = ps.compare(_scores(lambda s, t, noise: np.full(20, shifts[s]), seeds=3), "orchmoe", "lora", n_boot=500)[-1]
    assert row["boot_resolved"] and row["lo"] >= 1.0 and row["t"][0] < 0 < row["t"][1]
    assert not row["resolved"]
    assert "not resolved: the bootstrap interval excludes 0 but the t-interval" in ps.sentence(row)


def test_instances_are_crossed_when_every_seed_has_the_same_ones_and_nested_otherwise():
    crossed = _scores(lambda s, t, noise: noise, seeds=2, tasks=1)
    assert ps.pair(crossed, "orchmoe", "lora").crossed == {"t0": True}
    nested = {lab: {s: {"t0": {f"s{s}-{i}": v for i, v in per["t0"].items()}} for s, per in by.items()}
              for lab, by in crossed.items()}  # fmt: skip
    assert ps.pair(nested, "orchmoe", "lora").crossed == {"t0": False}
    with pytest.raises(ps.StatsError, match="share no seed"):
        ps.pair({"a": {0: {}}, "b": {1: {}}}, "a", "b")


def test_simulated_coverage_is_reported_for_both_intervals():
    boot, t = ps.simulate_coverage(3, 0.0, 0.0, 20.0, reps=20, tasks=2, n=5)
    assert 0.5 <= boot <= 1.0 and 0.5 <= t <= 1.0


def test_sign_test_and_t_quantile():
    assert ps.sign_test([1.0, 2.0, -0.5, 0.0]) == (2, 1, 1.0)
    assert ps.sign_test([1.0] * 6)[2] == pytest.approx(2 / 64)
    assert ps.t_quantile(2) == pytest.approx(4.303) and ps.t_quantile(30) == pytest.approx(2.042, abs=3e-3)


# ------------------------------------------------------------------------------------------------
# unseen_eval and keep_adapters on tiny runs


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama, superni, tmp_path_factory) -> Path:
    """A LoRA and a Poly run (2 steps), evaluated one prompt at a time, and a run folder still training."""
    from orchmoe.cli import main

    root = tmp_path_factory.mktemp("quality-toy")
    for name, method in (("lora-s0", "lora"), ("poly-s0", "poly")):
        argv = tiny_train_argv(tiny_llama, superni, root / name, "--method", method, max_steps=2, eval_batch_size=1)
        assert main(argv) == 0
    (root / "orchmoe-s0").mkdir()
    (root / "orchmoe-s0" / "config.yaml").write_text((root / "lora-s0" / "config.yaml").read_text())
    return root


def _results(run: Path) -> dict:
    return json.loads((run / "unseen14" / "results.json").read_text())


def _scoring_argv(tiny_runs: Path, superni: Path) -> list[str]:
    runs = [str(tiny_runs / n) for n in ("lora-s0", "poly-s0", "orchmoe-s0")]
    return [*runs, "--data", str(superni), "--per-task", "3", "--batch-size", "1"]


@pytest.fixture(scope="module")
def scored(tiny_runs, superni, tmp_path_factory) -> tuple[Path, Path, str]:
    """The tiny runs scored by unseen_eval.py on both test tasks x 3 instances, with the base model row:
    (runs' root, base folder, what it printed)."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("base")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        argv = [*_scoring_argv(tiny_runs, superni), "--base", str(base), "--copy-input", str(base.parent / "copy")]
        assert unseen_eval.main(argv) == 0
    return tiny_runs, base, printed.getvalue()


def test_unseen_eval_scores_every_test_task_on_fixed_instances_and_resumes(scored, superni, tmp_path, capsys):
    tiny_runs, base_dir, printed = scored
    assert "orchmoe-s0: not finished" in printed
    lora = _results(tiny_runs / "lora-s0")
    assert (lora["label"], lora["seed"], sorted(lora["tasks"])) == ("lora", 0, TEST_TASKS)
    for task, res in lora["tasks"].items():
        first = load_task(superni, task).instances[:3]  # the first instances: the same for every run and seed
        assert [i["id"] for i in res["instances"]] == [i["id"] for i in first]
        for inst, ref in zip(res["instances"], first):
            assert inst["scores"] == score_example(inst["prediction"], ref["output"])
    # the run's own evaluation scored task645's first 3 instances with the same prompts, one at a time
    own = [json.loads(line) for line in (tiny_runs / "lora-s0" / "predictions.jsonl").read_text().splitlines()]
    own = {r["id"]: r["prediction"] for r in own if not r["seen"]}
    assert {i["id"]: i["prediction"] for i in lora["tasks"]["task645_summarization"]["instances"]} == own
    assert _results(tiny_runs / "poly-s0")["method"] == "poly" and not (tiny_runs / "orchmoe-s0" / "unseen14").exists()
    base = json.loads((base_dir / "unseen14" / "results.json").read_text())
    assert (base["label"], base["seed"], base["fingerprint"]["adapter_sha256"]) == ("base", None, None)
    assert not (tiny_runs / "lora-s0" / "unseen14" / "partial").exists()
    copied = json.loads((base_dir.parent / "copy" / "unseen14" / "results.json").read_text())
    inst = load_task(superni, TEST_TASKS[0]).instances[0]  # "predict the input": a reference without a model
    assert copied["tasks"][TEST_TASKS[0]]["instances"][0]["scores"] == score_example(inst["input"], inst["output"])

    stamp = (tiny_runs / "lora-s0" / "unseen14" / "results.json").stat().st_mtime_ns
    assert unseen_eval.main(_scoring_argv(tiny_runs, superni)) == 0  # done: skipped, nothing rewritten
    assert "up to date, skipped" in capsys.readouterr().out
    assert (tiny_runs / "lora-s0" / "unseen14" / "results.json").stat().st_mtime_ns == stamp

    # an interrupted run resumes at the next task: a finished task's file is taken as it is
    out = tmp_path / "resume"
    part = {"fingerprint": lora["fingerprint"], "result": {**lora["tasks"][TEST_TASKS[0]], "n": 99}}
    (out / "quality-toy0" / "lora-s0" / "unseen14" / "partial").mkdir(parents=True)
    partial = out / "quality-toy0" / "lora-s0" / "unseen14" / "partial" / f"{TEST_TASKS[0]}.json"
    partial.write_text(json.dumps(part))
    lora_run = str(tiny_runs / "lora-s0")
    assert unseen_eval.main([lora_run, "--data", str(superni), "--per-task", "3", "--out", str(out)]) == 0
    resumed = json.loads((partial.parents[1] / "results.json").read_text())
    assert resumed["tasks"][TEST_TASKS[0]]["n"] == 99 and resumed["tasks"][TEST_TASKS[1]]["n"] == 3
    assert not partial.exists()


def test_unseen_eval_refuses_bad_input(tmp_path, superni, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("just text\n")
    with pytest.raises(SystemExit):
        unseen_eval.main([str(tmp_path / "nope")])
    with pytest.raises(unseen_eval.UnseenEvalError, match="does not hold an orchmoe run configuration"):
        unseen_eval.read_settings(tmp_path / "run")
    assert unseen_eval.main(["--base", str(tmp_path / "b"), "--data", str(superni)]) == 2
    assert "--like RUN" in capsys.readouterr().err
    assert unseen_eval.main(["--base", str(tmp_path / "b"), "--data", str(superni), "--per-task", "999"]) == 2


def test_paired_stats_cli_reads_unseen_results_and_runs_own_predictions(scored, tmp_path, capsys):
    tiny_runs, base_dir, _ = scored
    report = tmp_path / "report.md"
    assert (
        ps.main([str(tiny_runs), str(base_dir), "--pairs", "poly:lora", "--n-boot", "200", "--out", str(report)]) == 0
    )
    out = capsys.readouterr().out
    assert "| task | base (1) | lora (1) | poly (1) |" in out and "| poly − lora | **all tasks** |" in out
    assert (
        "1 seed × 6 instances): not resolved" in out
        and "#### Empty predictions" in out
        and report.read_text() in out + "\n"
    )
    assert ps.main([str(tiny_runs), "--part", "seen", "--pairs", "poly:lora", "--n-boot", "200"]) == 0
    assert "seen tasks (runs' own eval)" in capsys.readouterr().out
    assert ps.main([str(tiny_runs), "--pairs", "poly:lora", "--n-boot", "200", "--tasks", TEST_TASKS[1]]) == 0
    out = capsys.readouterr().out
    assert f"| poly − lora | {TEST_TASKS[1]} |" in out and f"| poly − lora | {TEST_TASKS[0]} |" not in out
    assert ps.main([str(tmp_path)]) == 2


def test_keep_adapters_copies_a_run_that_unseen_eval_takes_as_done(scored, superni, tmp_path, capsys):
    tiny_runs = scored[0]
    dest = tmp_path / "kept"
    assert keep_adapters.main([str(tiny_runs), "--dest", str(dest)]) == 0
    kept = dest / "toy0" / "lora-s0"  # the root's name without "quality-"
    names = {str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "config.yaml", "metrics.json", "predictions.jsonl"} <= names
    assert "unseen14/results.json" in names and not any(n.startswith("checkpoints") for n in names)
    assert not (dest / "toy0" / "orchmoe-s0").exists()  # unfinished: not kept
    assert "kept 2 run(s)" in capsys.readouterr().out
    assert keep_adapters.main([str(tiny_runs), "--dest", str(dest)]) == 0  # same adapters: refreshed in place
    assert unseen_eval.main([str(kept), "--data", str(superni), "--per-task", "3", "--batch-size", "1"]) == 0
    assert "up to date, skipped" in capsys.readouterr().out  # the copy is the same adapter, prompts and instances
    (kept / "adapter" / "adapter_model.safetensors").write_bytes(b"other")
    assert keep_adapters.main([str(tiny_runs / "lora-s0"), "--dest", str(dest), "--size", "toy0"]) == 2
    assert "another adapter" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# ablations: the runs planned, and the tables and figure over finished runs


def test_ablations_plan_shares_the_k_equals_t_run_with_the_sweep():
    runs = ablations.plan("all", "cpu", ["lora", "poly", "orchmoe"], ablations.parse_k("1,2,5,T", 10), [0, 1, 2])
    assert len({r["name"] for r in runs}) == 36 and len(runs) == 39  # K = T is OrchMoE 4x2 of the sweep
    assert ablations.parse_k("T,5,2,1,64", 10) == [10, 5, 2, 1]
    k5 = next(r for r in runs if r["name"] == "orchmoe-4x2-K5-s0")
    assert ablations.same_args(k5["args"], [*ablations.METHOD_ARGS["orchmoe"], "--n-abstract-tasks", "5"])
    lora16 = next(r for r in runs if r["name"] == "lora-r16-s2")
    assert lora16["args"] == ["--method", "lora", "--rank", "16"] and lora16["budget"] == ablations.BUDGETS[2]


def test_ablations_summarise_finished_runs_with_paired_cis(tiny_runs, tmp_path, capsys):
    root = tmp_path / "abl"
    root.mkdir()
    for name, src in (("lora-r8-s0", "lora-s0"), ("orchmoe-4x2-s0", "poly-s0"), ("orchmoe-4x2-K1-s0", "lora-s0")):
        (root / name).symlink_to(tiny_runs / src)  # stand-ins: the tables only read metrics and predictions
    argv = ["all", "--size", "cpu", "--seeds", "0", "--methods", "lora,orchmoe", "--k", "1,T", "--out", str(root),
            "--quality-root", str(tmp_path / "none"), "--results", str(tmp_path / "res")]  # fmt: skip
    assert ablations.main([*argv, "--dry-run"]) == 0
    assert "7 runs in all, 4 to train in shard 0/1" in capsys.readouterr().out
    assert ablations.main([*argv, "--dry-run", "--shard", "1/2"]) == 0  # names 1, 3, 5 of 7: r8 is done
    assert "7 runs in all, 2 to train in shard 1/2" in capsys.readouterr().out
    assert ablations.main([*argv, "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert "| orchmoe | 4x2 | 1× LoRA-r8 |" in out and "| 1 |" in out and "| 10 (T) |" in out
    assert (tmp_path / "res" / "score_vs_params-cpu.png").stat().st_size > 0
    paired = re.compile(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \([01]/1\)")
    assert paired.search((tmp_path / "res" / "redundancy-cpu.md").read_text())  # K = 1 against K = T, paired
