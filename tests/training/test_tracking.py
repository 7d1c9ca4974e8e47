"""`orchmoe train --report-to tensorboard`: the event file holds the losses, learning rates and routing."""

from __future__ import annotations

import pytest

from orchmoe.recipe.cli import main
from recipe_helpers import tiny_train_argv

pytest.importorskip("tensorboard")


def test_tensorboard_event_file_has_loss_lr_and_routing_scalars(tiny_llama, superni, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
        report_to="tensorboard",
    )
    assert main(args) == 0
    events = sorted(run.rglob("events.out.tfevents.*"))  # accelerate: the scalars, and the hparams in a subfolder
    assert events, f"no TensorBoard event file under {run}"
    accs = [EventAccumulator(str(e)) for e in events]
    for a in accs:
        a.Reload()
    acc = next((a for a in accs if "loss" in a.Tags()["scalars"]), accs[0])
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "aux_loss", "lr", "router_lr", "tokens_per_s", "allocation_spread", "pi_entropy"):
        assert tag in tags, (tag, sorted(tags))
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [2, 4, 6] and all(e.value > 0 for e in acc.Scalars("loss"))
    assert any(t.startswith("eval/seen/") for t in tags), sorted(tags)  # the final metrics
