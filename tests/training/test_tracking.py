"""`orchmoe train --report_to tensorboard mlflow`: two trackers at once, each read back, with the Trainer's names
(``train/...``, ``eval/...``), the routing diagnostics, per-task scores at the end, counts as counts; and the
trackers' files kept inside the run folder."""

from __future__ import annotations

import pytest

from orchmoe.cli import main
from recipe_helpers import tiny_train_argv

pytest.importorskip("tensorboard")
mlflow = pytest.importorskip("mlflow")


def test_two_trackers_record_the_trainers_names_and_the_routing(tiny_llama, superni, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (mlflow's default ./mlruns)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = tmp_path / "run"
    args = tiny_train_argv(
        tiny_llama,
        superni,
        run,
        train_per_task=8,
        eval_per_task=1,
        unseen_tasks=None,
        unseen_per_task=1,
        max_source_len=64,
        max_target_len=8,
        checkpoint_every=None,
        log_every=2,
        method="molora",
    )
    assert main([*args, "--report_to", "tensorboard", "mlflow"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    events = sorted((run / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {run / 'logs'}"
    accs = [EventAccumulator(str(e)) for e in events]
    for a in accs:
        a.Reload()
    tags = {t for a in accs for t in a.Tags()["scalars"]}
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/aux_loss"):  # MoLoRA: no allocation
        assert tag in tags, (tag, sorted(tags))
    acc = next(a for a in accs if "train/loss" in a.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6] and all(
        e.value > 0 for e in acc.Scalars("train/loss")
    )
    assert "eval/seen_rougeL" in tags and "eval/unseen_exact_match" in tags  # the final scores
    assert any(t.startswith("eval/seen_task/") for t in tags)  # per task at the end
    assert not any(t.endswith("/n") or t.endswith("_n") for t in tags)  # counts are not metrics

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file://{run / 'mlruns'}")
    (mlrun,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]  # one run
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert "eval_seen_rougeL" in mlrun.data.metrics and "aux_loss" in mlrun.data.metrics


def test_a_tracker_that_is_not_installed_is_an_error_before_training(tiny_llama, superni, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*tiny_train_argv(tiny_llama, superni, run), "--report_to", "tensorboard", "wandb"]) == 2
    assert "wandb is not installed" in capsys.readouterr().err and not run.exists()
