"""The `Accelerator` of a run (training or evaluation): precision, trackers, DDP settings, and the launch checks.

Several processes are started by ``torchrun`` (or ``accelerate launch --multi_gpu``, which runs torchrun). On a
machine without a GPU accelerate only forms a process group when told the processes are CPU processes, so
`make_accelerator` says so whenever the environment names several processes and there is no GPU: the
processes then train together over gloo. Every launch that would otherwise run independent copies of the
run (each believing it is process 0 of 1) is refused with the command that works (`launch_problem`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from orchmoe.recipe.options import TrainConfig, TrainConfigError

__all__ = ["LAUNCH_HELP", "LaunchError", "env_world_size", "launch_problem", "make_accelerator", "mixed_precision"]

#: how to start several processes, named by every launch error
LAUNCH_HELP = (
    "launch several processes with `torchrun --nproc_per_node N -m orchmoe train ...` or `accelerate launch "
    "--multi_gpu --num_machines 1 --num_processes N -m orchmoe train ...` (on a machine without GPUs too: "
    "the processes then use gloo); add --fsdp to shard the model (FSDP2)"
)

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(TrainConfigError):
    """The processes were started in a way that would not train together (or with an unsupported engine)."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_world_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher says this run has (torchrun's WORLD_SIZE or an MPI launcher's size)."""
    env = os.environ if env is None else env
    for name in _WORLD_VARS:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def launch_problem(env: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with how this process was launched (None: nothing), decided from the environment alone.

    * ``accelerate launch --use_deepspeed``: DeepSpeed is not supported (ZeRO's partitioning assumes a model it
      wraps and saves whole; the adapter's two-speed groups and adapter-only checkpoints are not wired to it).
    * ``accelerate launch --use_fsdp``: accelerate's FSDP is not used (on CPU it silently runs DDP; its FSDP1
      default rejects the adapted layers' mix of frozen and trainable weights); orchmoe's ``--fsdp`` is.
    * ``accelerate launch --cpu --num_processes N`` (or ``--num_processes N`` on a machine without GPUs): that
      launcher starts ONE process (several only through mpirun with ``--mpirun_hostfile``); recognised by the
      rendezvous address it sets for several processes while no launcher set a world size.
    """
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return (
            "DeepSpeed is not supported by orchmoe's training recipe; supported: DDP and FSDP (FSDP2, "
            "`orchmoe train --fsdp`). " + LAUNCH_HELP[0].upper() + LAUNCH_HELP[1:]
        )
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return (
            "accelerate's FSDP plugin (`accelerate launch --use_fsdp`) is not used by orchmoe; orchmoe shards with "
            "FSDP2 itself: launch with `accelerate launch --multi_gpu --num_machines 1 --num_processes N "
            "-m orchmoe train --fsdp ...` or `torchrun --nproc_per_node N -m orchmoe train --fsdp ...`"
        )
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    if launched_by_accelerate and "MASTER_ADDR" in env and env_world_size(env) == 1 and "LOCAL_RANK" not in env:
        return (
            "`accelerate launch` was asked for several processes but started this one alone (with --cpu, or "
            "without --multi_gpu on a machine without GPUs, it starts several only through mpirun): it would train "
            "as an independent single-process run. Instead " + LAUNCH_HELP + ". (For one process, unset MASTER_ADDR.)"
        )
    return None


def mixed_precision(mode: str) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16), no mixed precision on CPU."""
    if mode == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if mode == "fp16" and not torch.cuda.is_available():
        raise TrainConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    return mode


def make_accelerator(cfg: TrainConfig, **kwargs):
    """Gradient accumulation, mixed precision, trackers, and DDP without buffer broadcasts (the Task
    Router's statistics are kept equal on every process by their own all-gather).

    Raises:
        LaunchError: an unsupported engine (DeepSpeed, accelerate's FSDP), or processes that would not
            form one run (the launcher names several, the process group has one).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    problem = launch_problem()
    if problem:
        raise LaunchError(problem)
    world = env_world_size()
    # Without a GPU accelerate forms a process group only for CPU processes (else each process runs alone).
    kwargs.setdefault("cpu", world > 1 and not torch.cuda.is_available())
    trackers = None if cfg.report_to == "none" else cfg.report_to
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=mixed_precision(cfg.mixed_precision),
        log_with=trackers,
        project_dir=cfg.out,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        **kwargs,
    )
    if world > 1 and acc.num_processes != world:
        raise LaunchError(
            f"the launcher started {world} processes but accelerate formed a group of "
            f"{acc.num_processes} (distributed type {acc.distributed_type}): each would train alone. " + LAUNCH_HELP
        )
    return acc


def tracker_config(cfg: TrainConfig, resolved: dict) -> dict[str, Any]:
    """The run's options as the flat scalars trackers accept (TensorBoard hparams)."""
    flat: dict[str, Any] = {}
    for k, v in {**cfg.to_dict(), **{f"adapter.{a}": b for a, b in resolved.get("adapter", {}).items()}}.items():
        if k == "adapter":
            continue
        flat[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return flat


def end_tracking(accelerator, summary: dict, step: int) -> None:
    """The final scores to the trackers (``eval/seen/rougeL``, ...), then close them."""
    metrics = summary.get("metrics") or {}
    final = {
        f"eval/{part}/{k}": v
        for part in ("seen", "unseen")
        for k, v in metrics.get(part, {}).get("overall", {}).items()
        if isinstance(v, (int, float))
    }
    if final:
        accelerator.log(final, step=step)
    accelerator.end_training()
