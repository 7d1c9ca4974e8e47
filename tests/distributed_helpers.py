"""Launching several processes from a test (torchrun, accelerate launch): a free port, a clean environment, and
one retry when a process aborts in the C++ teardown."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher's variables, one thread per process."""
    launcher = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


#: what a C++ runtime prints when a thread is still joinable as the process ends: seen once under load, as a
#: SIGABRT of one gloo process after its work had finished (the same run passed alone)
TEARDOWN_ABORT = "terminate called without an active exception"


def launch(cmd: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a launcher; retried once, saying so, when a process aborted in the C++ teardown (any other failure
    is returned as it is)."""
    for attempt in (1, 2):
        proc = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr or attempt == 2:
            return proc
        print(f"launch: a process aborted at teardown ({TEARDOWN_ABORT!r}); retrying once: {' '.join(cmd[:6])} ...")
    return proc
