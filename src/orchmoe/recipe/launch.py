"""How the processes of a run were started, checked before anything is loaded: a launch that would give several
independent copies of the run (each believing it is process 0 of 1) or an engine the recipe does not use is
refused with the command that works. The processes themselves are the Trainer's (`transformers.Trainer` over
accelerate: DDP on GPUs, or gloo processes on a machine without GPUs)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from orchmoe.recipe.args import ArgumentsError

__all__ = ["LAUNCH_HELP", "LaunchError", "env_world_size", "launch_problem"]

#: how to start several processes, named by every launch error
LAUNCH_HELP = (
    "launch several processes with `torchrun --nproc_per_node N -m orchmoe train ...` or `accelerate launch "
    "--multi_gpu --num_machines 1 --num_processes N -m orchmoe train ...` (on a machine without GPUs too: "
    "the processes then use gloo)"
)
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(ArgumentsError):
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

    * ``accelerate launch --use_deepspeed``: not supported (ZeRO partitions and saves a model it wraps whole; the
      adapter-only checkpoints and the routers' state are not wired to it).
    * ``accelerate launch --cpu --num_processes N`` (or ``--num_processes N`` without GPUs): that launcher starts
      ONE process, recognised by the rendezvous address it sets while no launcher set a world size.
    """
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed is not supported by orchmoe's training recipe; supported: DDP. " + LAUNCH_HELP.capitalize()
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    if launched_by_accelerate and "MASTER_ADDR" in env and env_world_size(env) == 1 and "LOCAL_RANK" not in env:
        return (
            "`accelerate launch` was asked for several processes but started this one alone (with --cpu, or "
            "without --multi_gpu on a machine without GPUs, it starts several only through mpirun): it would train "
            "as an independent single-process run. Instead " + LAUNCH_HELP + ". (For one process, unset MASTER_ADDR.)"
        )
    return None


def check_launch(world_size: int) -> None:
    """Raise `LaunchError` for a bad launch, or a process group smaller than the launcher started."""
    problem = launch_problem()
    if problem:
        raise LaunchError(problem)
    launched = env_world_size()
    if launched > 1 and world_size != launched:
        raise LaunchError(
            f"the launcher started {launched} processes but they formed a group of {world_size}: each would train "
            "alone. " + LAUNCH_HELP
        )
