"""The training recipe over transformers' Trainer: artefacts, data, exact resume after SIGKILL, every method, T5,
budgets, options as the Hugging Face stack spells them."""

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

from orchmoe.cli import main
from orchmoe.core.registry import METHODS
from orchmoe.recipe.args import ArgumentsError
from orchmoe.recipe.parse import parse_train_args
from orchmoe.recipe.run_data import build_data
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.recipe.train import train
from recipe_helpers import SEEN, UNSEEN, tiny_train_argv, tiny_train_config


def latest_checkpoint(run: Path) -> Path | None:
    found = [c for c in RunFolder(run).checkpoints() if (c / RunFolder.MANIFEST).is_file()]
    return found[-1] if found else None


def cfg_for(model: Path, data: Path, out: Path, *extra: str, **kw):
    return tiny_train_config(model, data, out, *extra, **{"eval_batch_size": 8, "log_every": 1, **kw})


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
    assert all(r["loss"] > 0 and r["learning_rate"] >= 0 and r["grad_norm"] >= 0 for r in log)  # the Trainer's names
    # routing you can watch: OrchMoE's records carry the allocation spread and the Task Router's statistics
    for r in log:
        assert r["allocation_spread"] >= 0 and 0 <= r["pi_entropy"] <= 1.1 * torch.log(torch.tensor(3.0))
        assert isinstance(r["abstract_tasks_used"], int) and 1 <= r["abstract_tasks_used"] <= r["abstract_tasks"] == 3
        assert 0 <= r["nmi_pi_task"] <= 1 and "aux_loss" not in r  # OrchMoE without a balance term has none
    assert all(r["router_learning_rate"] == pytest.approx(r["learning_rate"] * 0.1 / 1e-2) for r in log)
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    record = meta["orchmoe"]["metadata"]
    assert meta["peft_type"] == "ORCHMOE_ORCHMOE" and record["task_to_id"] == {t: i for i, t in enumerate(sorted(SEEN))}
    assert record["unseen_tasks"] == [UNSEEN] and record["categories"][UNSEEN] == "Keyword Tagging"
    assert record["prompt_format"] == {
        "template": "tk-instruct",
        "n_pos": 1,
        "max_source_len": 96,
        "max_target_len": 12,
        "chat_template": False,
        "decoder_only": True,
        "definition": True,
        "max_new_tokens": None,
    }

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "orchmoe" and cfg["learning_rate"] == 1e-2 and cfg["_resolved"]["total_steps"] == 9
    assert cfg["_resolved"]["adapter"]["n_abstract_tasks"] == len(SEEN)  # K = T unless set, as the paper

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seen"]["overall"]["n"] == 9 and metrics["unseen"]["overall"]["n"] == 3
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {p["task"] for p in preds} == set(SEEN) | {UNSEEN}

    # the Trainer's checkpoints hold the adapter and optimizer state only, never the frozen base weights
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "checkpoint-9" and RunFolder(run).verify_checkpoint(ckpt) is None
    assert set(load_file(str(ckpt / "adapter_model.safetensors"))) == set(adapter_tensors(run))
    base_bytes = (tiny_llama / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) < base_bytes / 2
    assert {p.name for p in ckpt.iterdir()} >= {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "config.yaml",
        "manifest.json",
    }
    # a finished run folder is not silently overwritten
    with pytest.raises(ArgumentsError, match="finished run"):
        train(cfg_for(tiny_llama, superni, run))


def test_data_is_seeded_and_disjoint(superni, tiny_llama, tmp_path):
    cfg = cfg_for(tiny_llama, superni, tmp_path, train_per_task=40, eval_per_task=10)
    a, b = build_data(cfg.data, 0), build_data(cfg.data, 0)
    assert [(e.task, e.id) for e in a.train] == [(e.task, e.id) for e in b.train]
    train_ids, eval_ids = {(e.task, e.id) for e in a.train}, {(e.task, e.id) for e in a.eval}
    assert len(train_ids) == 120 and len(eval_ids) == 30 and not train_ids & eval_ids
    assert all(not e.seen for e in a.unseen) and all(e.seen for e in a.eval)
    assert {(e.task, e.id) for e in build_data(cfg.data, 1).train} != train_ids
    draw = cfg_for(
        tiny_llama, superni, tmp_path, tasks=5, train_per_task=40, eval_per_task=10, task_seed=7, unseen_tasks=0
    )
    drawn = [build_data(draw.data, s) for s in (0, 1)]
    assert drawn[0].seen_tasks == drawn[1].seen_tasks  # a fixed task draw across seeds ...
    assert {(e.task, e.id) for e in drawn[0].train} != {(e.task, e.id) for e in drawn[1].train}  # ... new instances


# -- exact resume ----------------------------------------------------------------------------
def test_sigkill_resume_matches_unbroken_run(tiny_llama, superni, tmp_path):
    """A real SIGKILL after the first checkpoint, then a resume through the Trainer: bit-identical final adapter and
    logs (checkpoints on logging steps: the Trainer starts a new logging window where it resumes)."""
    opts = dict(
        train_per_task=16,
        epochs=2,
        grad_accum=2,
        batch_size=2,
        checkpoint_every=4,
        eval=False,
        log_every=2,
        balance_coef=0.01,
    )
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "killed.log", "wb")
    args = tiny_train_argv(tiny_llama, superni, killed, **opts)
    proc = subprocess.Popen([sys.executable, "-m", "orchmoe", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        unbroken = tmp_path / "unbroken"  # trained here while the subprocess starts up
        train(cfg_for(tiny_llama, superni, unbroken, **opts))
        deadline = time.monotonic() + 180
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

    train(cfg_for(tiny_llama, superni, killed, **opts))  # same options: resumes from the checkpoint
    a, b = adapter_tensors(unbroken), adapter_tensors(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (unbroken / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "aux_loss", "learning_rate")
    assert [tuple(r[k] for k in keys) for r in la] == [tuple(r[k] for k in keys) for r in lb]
    assert json.loads((killed / "train_summary.json").read_text())["steps"] == 24  # 48 examples / 2 / 2, two epochs


def test_resume_refuses_a_changed_configuration(tiny_llama, superni, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_llama, superni, run, max_steps=4, checkpoint_every=2, eval=False))
    (run / "train_summary.json").unlink()  # as if killed after the checkpoint
    with pytest.raises(ArgumentsError, match="learning_rate"):
        train(cfg_for(tiny_llama, superni, run, max_steps=4, checkpoint_every=2, eval=False, lr=5e-3))
    # --overwrite starts afresh instead
    train(cfg_for(tiny_llama, superni, run, max_steps=2, checkpoint_every=0, eval=False, lr=5e-3, overwrite=True))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 2
    assert latest_checkpoint(run) is None


def test_resume_falls_back_past_a_corrupted_checkpoint(tiny_llama, superni, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_llama, superni, run, max_steps=6, checkpoint_every=2, save_total_limit=3, eval=False))
    (run / "train_summary.json").unlink()
    (run / "adapter" / "adapter_model.safetensors").unlink()
    newest = run / "checkpoint-6" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:-7])  # a flipped tail: the manifest's checksum catches it
    with pytest.warns(UserWarning, match="checkpoint-6.*set aside as corrupt-checkpoint-6"):
        summary = train(
            cfg_for(tiny_llama, superni, run, max_steps=6, checkpoint_every=2, save_total_limit=3, eval=False)
        )
    assert summary["steps"] == 6 and (run / "corrupt-checkpoint-6").is_dir()
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # one run's log, no repeated steps


# -- methods, models, options ----------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method, tiny_llama, superni, tmp_path):
    out = tmp_path / method
    summary = train(cfg_for(tiny_llama, superni, out, method=method, max_steps=3, eval=False))
    assert summary["steps"] == 3
    # B starts at zero for every method: a non-zero B means the optimizer really updated the experts
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(out).items() if k.endswith("lora_B"))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert ("aux_loss" in log[-1]) == (method == "molora")  # only a method with a balance loss logs one


def test_encoder_decoder_trains_and_evaluates(tiny_t5, superni, tmp_path):
    out = tmp_path / "t5"
    summary = train(cfg_for(tiny_t5, superni, out, method="poly", max_steps=3))
    assert summary["metrics"]["seen"]["overall"]["n"] == 9
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(isinstance(p["prediction"], str) for p in preds)


def test_budget_rank_matches_a_lora_budget(tiny_llama, superni, tmp_path):
    lora = train(cfg_for(tiny_llama, superni, tmp_path / "lora", method="lora", rank=8, max_steps=0, eval=False))
    # (the tiny model is so narrow that OrchMoE's task router alone is a third of the budget at K=16)
    orch = train(
        cfg_for(
            tiny_llama,
            superni,
            tmp_path / "orch",
            method="orchmoe",
            budget_rank=8,
            n_skills=2,
            n_abstract_tasks=2,
            max_steps=0,
            eval=False,
        )
    )
    assert abs(orch["trainable_parameters"] - lora["trainable_parameters"]) <= 0.1 * lora["trainable_parameters"]
    resolved = yaml.safe_load((tmp_path / "orch" / "config.yaml").read_text())["_resolved"]["adapter"]
    assert resolved["method"] == "orchmoe" and resolved["rank"] > 2  # grown from the default rank 2
    with pytest.raises(ArgumentsError, match="budget"):
        train(cfg_for(tiny_llama, superni, tmp_path / "x", method="orchmoe", budget_rank=8, rank=2, max_steps=0))


def test_gradient_checkpointing_gives_the_same_update(tiny_llama, superni, tmp_path):
    a, b = tmp_path / "plain", tmp_path / "ckpt"
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
    with pytest.raises(ArgumentsError, match="n-abstract-tasks"):  # not an option of LoRA
        cfg_for(tiny_llama, superni, tmp_path / "x", method="lora", n_abstract_tasks=4)
    with pytest.raises(ArgumentsError, match=r"unknown method 'moe'; choose one of \[.*'lora'"):
        parse_train_args(["--method", "moe"])


def test_training_arguments_spellings_and_yaml_work_on_the_command_line(tiny_llama, superni, tmp_path):
    """Every TrainingArguments spelling as it is, on the command line and in a file; the file's `adapter:` section."""
    flags = [
        "--model_name_or_path",
        str(tiny_llama),
        "--data",
        str(superni),
        "--tasks",
        ",".join(SEEN),
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(tmp_path / "a"),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "1",
        "--bf16",
        "--lr_scheduler_type",
        "cosine",
        "--save_strategy",
        "no",
    ]
    options = parse_train_args(flags)
    t = options.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.max_steps, t.bf16) == (1e-3, 4, 1, True)
    assert t.output_dir == str(tmp_path / "a") and str(t.lr_scheduler_type.value) == "cosine"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"learning_rate: 3e-4\nper_device_train_batch_size: 2\nmethod: poly\nadapter:\n  n_skills: 3\n"
        f"output_dir: {tmp_path / 'b'}\n"
    )
    options = parse_train_args(["--config", str(config), "--lr", "5e-4"])  # the command line wins over the file
    assert options.training.learning_rate == 5e-4 and options.training.per_device_train_batch_size == 2
    assert options.model.method == "poly" and options.adapter.n_skills == 3
