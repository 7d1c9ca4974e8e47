"""Training recipe: artefacts, data order, exact resume after SIGKILL, every method, T5, budgets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchmoe.core.config import METHODS
from orchmoe.recipe import RunFolder, TrainConfig, TrainConfigError, train
from orchmoe.recipe.batches import epoch_batches, rank_slice
from orchmoe.recipe.cli import main
from orchmoe.recipe.data import build_data
from recipe_helpers import REPO, SEEN, UNSEEN, save_tiny, tiny_train_argv, tiny_train_config  # noqa: F401


def latest_checkpoint(run: Path) -> Path | None:
    return RunFolder(run).latest_checkpoint()


def cfg_for(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    return tiny_train_config(model, data, out, **{"eval_batch_size": 8, "log_every": 1, **kw})


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


# -- end to end ------------------------------------------------------------------------------


def test_cli_train_writes_every_artefact(tiny_llama, superni, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train_argv(tiny_llama, superni, run, checkpoint_every=3, log_every=2)) == 0
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "config.yaml",
        "train_log.jsonl",
        "train_summary.json",
        "metrics.json",
        "metrics.md",
        "predictions.jsonl",
    ):
        assert (run / name).is_file(), name

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 9  # 36 examples / batch 4, one epoch
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8, 9]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in log)
    # routing you can watch: OrchMoE's records carry the allocation spread and the Task Router's statistics
    for r in log:
        assert r["allocation_spread"] >= 0 and 0 <= r["pi_entropy"] <= r["pi_entropy_max"] + 1e-6
        assert 0 < r["abstract_tasks_used"] <= 1 and 0 <= r["nmi_pi_task"] <= 1
    assert all(
        r["router_lr"] == pytest.approx(r["lr"] * 0.1 / 1e-2) for r in log
    )  # the references' 0.1, scheduled alike
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())["metadata"]
    assert meta["task_to_id"] == {t: i for i, t in enumerate(sorted(SEEN))}
    assert meta["unseen_tasks"] == [UNSEEN] and meta["categories"][UNSEEN] == "Keyword Tagging"

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "orchmoe" and cfg["lr"] == 1e-2 and cfg["_resolved"]["total_steps"] == 9
    assert cfg["_resolved"]["adapter"]["n_abstract_tasks"] == len(SEEN)  # K = T unless set, as the paper
    assert cfg["_resolved"]["batch_mix"]["tasks_per_batch"] > 1

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seen"]["overall"]["n"] == 9 and metrics["unseen"]["overall"]["n"] == 3
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {p["task"] for p in preds} == set(SEEN) | {UNSEEN}

    # Checkpoints hold the adapter and optimizer state only, never the frozen base weights.
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-00000006"
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_tensors(run))
    base_bytes = (tiny_llama / "model.safetensors").stat().st_size
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert ckpt_bytes < base_bytes / 2
    assert {p.name for p in ckpt.iterdir()} >= {
        "adapter",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "trainer_state.json",
        "config.yaml",
    }

    # A finished run folder is not silently overwritten.
    with pytest.raises(TrainConfigError, match="finished run"):
        train(cfg_for(tiny_llama, superni, run))


def test_data_is_seeded_and_disjoint(superni, tiny_llama, tmp_path):
    cfg = cfg_for(tiny_llama, superni, tmp_path, train_per_task=40, eval_per_task=10)
    a, b = build_data(cfg), build_data(cfg)
    assert [(e.task, e.id) for e in a.train] == [(e.task, e.id) for e in b.train]
    train_ids = {(e.task, e.id) for e in a.train}
    eval_ids = {(e.task, e.id) for e in a.eval}
    assert len(train_ids) == 120 and len(eval_ids) == 30 and not train_ids & eval_ids
    assert all(not e.seen for e in a.unseen) and all(e.seen for e in a.eval)
    other = build_data(cfg_for(tiny_llama, superni, tmp_path, train_per_task=40, eval_per_task=10, seed=1))
    assert {(e.task, e.id) for e in other.train} != train_ids
    drawn = [
        build_data(
            cfg_for(
                tiny_llama,
                superni,
                tmp_path,
                tasks=5,
                train_per_task=40,
                eval_per_task=10,
                seed=s,
                task_seed=7,
                unseen_tasks=0,
            )
        )
        for s in (0, 1)
    ]
    assert drawn[0].seen_tasks == drawn[1].seen_tasks  # a fixed task draw across seeds ...
    assert {(e.task, e.id) for e in drawn[0].train} != {(e.task, e.id) for e in drawn[1].train}  # ... new instances


def test_batch_order_is_a_function_of_seed_and_epoch():
    lengths = [(i * 37) % 23 + 1 for i in range(50)]
    e0 = epoch_batches(lengths, 4, 2, seed=3, epoch=0)
    assert e0 == epoch_batches(lengths, 4, 2, seed=3, epoch=0)
    assert e0 != epoch_batches(lengths, 4, 2, seed=3, epoch=1)
    assert sorted(i for g in e0 for i in g) == list(range(50))
    for g in e0:  # the processes' shares partition each global batch
        shares = [rank_slice(g, r, 2) for r in range(2)]
        assert all(shares)
        if len(g) >= 2:
            assert sorted(shares[0] + shares[1]) == sorted(g)
    assert rank_slice([7], 1, 2) == [7]  # a one-example batch still gives every process work


def test_batches_mix_tasks_and_still_group_lengths():
    """Prompt length is mostly set by the task. Sorting a big window by length puts one task in a batch;
    the stratified order with a small window mixes tasks while padding less than random batches."""
    import random

    from orchmoe.data import batch_mix

    rng = random.Random(0)
    tasks = [t for t in range(10) for _ in range(40)]
    lengths = [30 + 12 * t + rng.randint(0, 10) for t in tasks]  # each task its own length band
    mix = {w: batch_mix(epoch_batches(lengths, 8, 1, 0, 0, tasks, w), tasks, lengths) for w in (1, 4, 50)}
    rng.shuffle(shuffled := list(range(len(tasks))))
    random_batches = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    plain = batch_mix(random_batches, tasks, lengths)
    assert mix[50]["tasks_per_batch"] < 2.0  # a big length window: (nearly) single-task batches
    assert mix[1]["tasks_per_batch"] >= 6.5 and mix[4]["tasks_per_batch"] >= 2.5
    assert mix[4]["padding_share"] < 0.6 * plain["padding_share"]  # still grouped by length
    order = epoch_batches(lengths, 8, 1, 0, 0, tasks, 4)
    assert sorted(i for b in order for i in b) == list(range(len(tasks)))
    first_half = [tasks[i] for b in order[: len(order) // 2] for i in b]  # every task spread over the epoch
    assert all(12 <= first_half.count(t) <= 28 for t in range(10))


# -- exact resume ----------------------------------------------------------------------------


def test_sigkill_resume_matches_unbroken_run(tiny_llama, superni, tmp_path):
    """A real SIGKILL after the first checkpoint, then a resume: bit-identical final adapter."""
    opts = dict(train_per_task=16, epochs=2, grad_accum=2, batch_size=2, checkpoint_every=4, eval=False, log_every=3)
    train_opts = dict(opts, method="orchmoe", adapter={"balance_coef": 0.01})  # the CLI run's, for train()
    killed = tmp_path / "killed"
    args = tiny_train_argv(tiny_llama, superni, killed, "--adapter-arg", "balance_coef=0.01", **opts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchmoe", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        unbroken = tmp_path / "unbroken"  # trained here while the subprocess starts up
        train(cfg_for(tiny_llama, superni, unbroken, **train_opts))
        deadline = time.monotonic() + 120
        while latest_checkpoint(killed) is None:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    first = latest_checkpoint(killed)
    assert first is not None and int(first.name.split("-")[1]) < 24

    train(cfg_for(tiny_llama, superni, killed, **train_opts))  # same options: resumes from the checkpoint
    a, b = adapter_tensors(unbroken), adapter_tensors(killed)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (unbroken / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in la] == [
        (r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in lb
    ]
    assert json.loads((killed / "train_summary.json").read_text())["steps"] == 24  # 48 examples / 2 / 2, two epochs


def test_resume_refuses_a_changed_configuration(tiny_llama, superni, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_llama, superni, run, max_steps=4, checkpoint_every=2, eval=False))
    (run / "train_summary.json").unlink()  # as if killed after the checkpoint
    with pytest.raises(TrainConfigError, match="lr"):
        train(cfg_for(tiny_llama, superni, run, max_steps=4, checkpoint_every=2, eval=False, lr=5e-3))
    # --overwrite starts afresh instead
    train(cfg_for(tiny_llama, superni, run, max_steps=2, checkpoint_every=0, eval=False, lr=5e-3, overwrite=True))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 2
    assert latest_checkpoint(run) is None


# -- methods, models, options ----------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method, tiny_llama, superni, tmp_path):
    out = tmp_path / method
    summary = train(cfg_for(tiny_llama, superni, out, method=method, max_steps=3, eval=False))
    assert summary["steps"] == 3
    # B starts at zero for every method: a non-zero B means the optimizer really updated the experts
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(out).items() if k.endswith("lora_B"))


def test_encoder_decoder_trains_and_evaluates(tiny_t5, superni, tmp_path):
    out = tmp_path / "t5"
    summary = train(cfg_for(tiny_t5, superni, out, method="poly", max_steps=3))
    assert summary["metrics"]["seen"]["overall"]["n"] == 9
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(isinstance(p["prediction"], str) for p in preds)


def test_budget_rank_matches_a_lora_budget(tiny_llama, superni, tmp_path):
    lora = train(
        cfg_for(tiny_llama, superni, tmp_path / "lora", method="lora", adapter={"rank": 8}, max_steps=0, eval=False)
    )
    # (the tiny model is so narrow that OrchMoE's task router alone is a third of the budget at K=16)
    orch = train(
        cfg_for(
            tiny_llama,
            superni,
            tmp_path / "orch",
            method="orchmoe",
            budget_rank=8,
            adapter={"n_skills": 2, "n_abstract_tasks": 2},
            max_steps=0,
            eval=False,
        )
    )
    assert abs(orch["trainable_parameters"] - lora["trainable_parameters"]) <= 0.1 * lora["trainable_parameters"]
    resolved = yaml.safe_load((tmp_path / "orch" / "config.yaml").read_text())["_resolved"]["adapter"]
    assert resolved["method"] == "orchmoe" and resolved["rank"] > 2  # grown from the default rank 2
    with pytest.raises(TrainConfigError, match="budget"):
        TrainConfig(method="orchmoe", budget_rank=8, adapter={"rank": 2})


def test_gradient_checkpointing_gives_the_same_update(tiny_llama, superni, tmp_path):
    a = tmp_path / "plain"
    b = tmp_path / "ckpt"
    train(cfg_for(tiny_llama, superni, a, max_steps=2, eval=False))
    train(cfg_for(tiny_llama, superni, b, max_steps=2, eval=False, gradient_checkpointing=True))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5)


def test_max_steps_zero_is_the_untrained_model(tiny_llama, superni, tmp_path):
    summary = train(cfg_for(tiny_llama, superni, tmp_path / "base", method="lora", max_steps=0, eval=False))
    assert summary["steps"] == 0
    assert all(t.abs().sum() == 0 for k, t in adapter_tensors(tmp_path / "base").items() if k.endswith("lora_B"))


def test_method_options_are_validated(tiny_llama, superni, tmp_path):
    with pytest.raises(TrainConfigError, match="n_abstract_tasks"):
        train(
            cfg_for(
                tiny_llama,
                superni,
                tmp_path / "x",
                method="lora",
                adapter={"n_abstract_tasks": 4},
                max_steps=0,
                eval=False,
            )
        )
    with pytest.raises(TrainConfigError, match=r"method must be one of \[.*'lora'.*got 'moe'"):
        TrainConfig(method="moe")
