"""Several processes on CPU (gloo): DDP and FSDP2 runs of the recipe equal one process running the same global
batch, FSDP checkpoints resume exactly, evaluation makes equal generate() counts, and every launch that would
run independent copies (or an unsupported engine) fails loudly with the command that works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distributed_helpers import free_port, launch
from orchmoe.evaluation.generate import process_batches
from orchmoe.recipe.args import ArgumentsError
from orchmoe.recipe.launch import LaunchError, check_launch, env_world_size, launch_problem
from orchmoe.recipe.train import train
from recipe_helpers import tiny_train_argv, tiny_train_config

STEPS, PER_PROCESS, WORLD = 4, 2, 2
# The tiny run (recipe_helpers) with LoRA without dropout: nothing random in training, so one process and two
# see the same computation.
OPTIONS = dict(
    train_per_task=8,
    eval_per_task=2,
    unseen_per_task=2,
    eval_batch_size=3,
    lr=1e-3,
    warmup_steps=0,
    method="lora",
    max_steps=STEPS,
    log_every=1,
)


def cli_args(model: Path, data: Path, out: Path, **overrides) -> list[str]:
    return tiny_train_argv(model, data, out, **{**OPTIONS, **overrides})


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(WORLD),
            "--master_port",
            str(free_port()),
            "-m",
            "orchmoe",
            *args,
        ]
    )


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"adapters differ by {worst:.3g} (tolerance {tol})"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def predictions(run: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len({(r["task"], r["id"]) for r in rows}) == len(rows)  # every example once
    return {f"{r['task']}/{r['id']}": r["prediction"] for r in rows}


@pytest.fixture(scope="module")
def one_process(tiny_llama, superni, tmp_path_factory) -> Path:
    """The reference: one process running the global batch (per-process batch x processes)."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(tiny_train_config(tiny_llama, superni, out, batch_size=PER_PROCESS * WORLD, **OPTIONS))
    return out


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(tiny_llama, superni, one_process, tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun(cli_args(tiny_llama, superni, run, batch_size=PER_PROCESS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resolved = yaml.safe_load((run / "config.yaml").read_text())["_resolved"]
    assert resolved["num_processes"] == WORLD and resolved["effective_batch_size"] == PER_PROCESS * WORLD
    assert_close(adapter(run), adapter(one_process), 1e-5)
    assert losses(run) == pytest.approx(losses(one_process), abs=1e-5)  # the loss of the whole global batch
    # scored and written once, by the main process: one report, every example predicted once, as one process does
    assert proc.stdout.count("predictions: ") == 1
    assert predictions(run) == predictions(one_process)


def test_accelerate_multi_gpu_flag_runs_gloo_processes_on_cpu(tiny_llama, superni, tmp_path):
    """The accelerate command the launch errors name: two processes that train together, also without a GPU."""
    run = tmp_path / "acc"
    proc = launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            str(WORLD),
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "orchmoe",
            *cli_args(tiny_llama, superni, run, batch_size=PER_PROCESS, max_steps=2, eval=False),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["_resolved"]["num_processes"] == WORLD
    assert proc.stdout.count("saved adapter to") == 1


def test_accelerate_cpu_launch_of_several_processes_fails_loudly(tiny_llama, superni, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: refused before it touches the run folder."""
    run = tmp_path / "refused"
    proc = launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            str(WORLD),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "orchmoe",
            *cli_args(tiny_llama, superni, run, batch_size=PER_PROCESS),
        ]
    )
    assert proc.returncode != 0
    assert "started this one alone" in proc.stderr and "torchrun --nproc_per_node N" in proc.stderr
    assert "--multi_gpu --num_machines 1" in proc.stderr
    assert not run.exists()


def test_processes_that_do_not_form_one_group_are_refused(monkeypatch):
    """A launcher started two processes but they formed a group of one: a LaunchError, not two independent copies."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="the launcher started 2 processes but they formed a group of 1"):
        check_launch(1)
    check_launch(2)


def test_launch_problem_names_unsupported_engines_and_one_process_launches():
    assert launch_problem({}) is None
    torchrun_env = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "ACCELERATE_MIXED_PRECISION": "no"}
    assert launch_problem(torchrun_env) is None  # accelerate launch --multi_gpu runs torchrun: fine
    deepspeed = launch_problem({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert "DeepSpeed is not supported" in deepspeed and "supported: DDP" in deepspeed
    single = launch_problem(
        {
            "ACCELERATE_MIXED_PRECISION": "no",
            "ACCELERATE_USE_CPU": "True",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        }
    )
    assert "started this one alone" in single
    assert launch_problem({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}) is None  # one process
    assert env_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4 and env_world_size({}) == 1


def test_fsdp_without_gpus_is_refused(tiny_llama, superni, tmp_path):
    """The Trainer's FSDP (accelerate's) runs on GPUs; without one it would silently become DDP."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the Trainer's FSDP")
    with pytest.raises(ArgumentsError, match="the Trainer.s FSDP .accelerate.s. needs GPUs"):
        tiny_train_config(tiny_llama, superni, tmp_path / "run", "--fsdp", "full_shard", **OPTIONS)


@pytest.mark.parametrize("n_batches", range(0, 8))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_process_makes_the_same_number_of_generate_calls(n_batches, world):
    batches = [[2 * b, 2 * b + 1] for b in range(n_batches)]
    shares = [process_batches(batches, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # equal generate() counts
    assert len(shares[0]) == -(-n_batches // world)
    kept = sorted(i for s in shares for idx, keep in s if keep for i in idx)
    assert kept == list(range(2 * n_batches))  # every example predicted once
    assert all(idx == batches[-1] for s in shares for idx, keep in s if not keep)  # repeats: the shortest batch
