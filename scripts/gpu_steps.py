"""The GPU check's machinery: a call's time budget, its steps and their records, and bounded subprocesses.

Why here: the quick and quality calls (scripts/gpu_check.py, scripts/gpu_quality.py) share it, and the
budget rules (a step gets at most its cap, never more than what is left less a reserve, else it is
recorded as not run) are tested on their own (tests/test_gpu_check.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESERVE = 15  # seconds kept back for the summary


class Budget:
    """Seconds left of a call's budget, counted from ``start`` (the wall clock when gpu_check.sh began)."""

    def __init__(self, total: float, start: float, reserve: float = RESERVE, clock: Callable[[], float] = time.time):
        self.total, self.start, self.reserve, self.clock = total, start, reserve, clock

    def left(self) -> float:
        return self.total - (self.clock() - self.start)

    def grant(self, cap: float, need: float) -> int | None:
        """Seconds a step may take: ``cap``, or less when less is left (after the reserve); None below ``need``."""
        t = min(cap, self.left() - self.reserve)
        return int(t) if t >= need else None


@dataclass
class Ctx:
    """What every step sees: the mode, the folders, the budget, and the records so far."""

    mode: str
    dry: bool
    state: Path  # kept while the machine stays warm (the model's first part, staged files)
    out: Path  # what the device tool brings back (<= 8 files)
    bundle: Path  # the carried pieces (.gpu/)
    budget: Budget
    python: str = sys.executable
    records: list[dict] = field(default_factory=list)
    stop: str | None = None  # set by a step after which nothing else can run (the reason)


@dataclass
class Step:
    key: str
    title: str
    cap: int  # seconds at most
    need: int  # seconds at least, else not run
    run: Callable[[Ctx, int], dict]


def run_cmd(cmd: list[str], seconds: float, env: dict | None = None, log: Path | None = None) -> tuple[int, bool]:
    """Run ``cmd`` for at most ``seconds``; (exit code, timed out). Its output goes into ours (hence the
    call's log) and, with ``log``, into that file too. On time-out the whole process group is ended: a
    benchmark's children must not outlive the step."""
    print("$ " + " ".join(c if len(c) < 200 else c[:60] + "..." for c in cmd), flush=True)
    pipe = subprocess.PIPE if log is not None else None
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        stdout=pipe,
        stderr=subprocess.STDOUT if log is not None else None,
    )
    copier = threading.Thread(target=_copy, args=(proc.stdout, log), daemon=True) if log is not None else None
    if copier is not None:
        copier.start()
    try:
        return proc.wait(timeout=seconds), False
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(timeout=grace), True
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        return -9, True
    finally:
        if copier is not None:
            copier.join(timeout=10)


def _copy(stream, log: Path) -> None:
    """Every line of ``stream`` to our stdout and to ``log``."""
    with open(log, "wb") as f:
        for line in iter(stream.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            f.write(line)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: the device tool may collect $OUT while a later step is still writing."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_step(ctx: Ctx, step: Step) -> dict:
    """One step inside the budget; its record (status ok / failed / timed out / not run, seconds, data)."""
    record = {"key": step.key, "title": step.title}
    seconds = None if ctx.stop else ctx.budget.grant(step.cap, step.need)
    if ctx.stop:
        record.update(status="not run", reason=ctx.stop)
    elif seconds is None:
        left = max(0, int(ctx.budget.left() - ctx.budget.reserve))
        record.update(
            status="not run", reason=f"no time left: {left} s of the call's budget, this needs ~{step.need} s"
        )
    else:
        print(f"\n== [{ctx.budget.total - ctx.budget.left():5.0f} s] {step.title} (<= {seconds} s)", flush=True)
        t0 = time.time()
        try:
            record.update(step.run(ctx, seconds))
        except Exception as e:  # noqa: BLE001  (recorded: the other steps still run)
            record.update(status="failed", reason=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.time() - t0, 1)
        print(f"== {step.title}: {record.get('status')} {record.get('reason', '')}".rstrip(), flush=True)
    ctx.records.append(record)
    return record


def outcome(rc: int, timed_out: bool, seconds: int, data: dict | None = None) -> dict:
    """A benchmark's record from its exit: exit code 1 with results means its targets failed, not the run."""
    if timed_out:
        return {"status": "timed out", "reason": f"stopped after {seconds} s", "rc": rc, "data": data}
    if rc == 0 or (rc == 1 and data is not None):
        return {"status": "ok", "rc": rc, "data": data}
    return {"status": "failed", "reason": f"exit code {rc}", "rc": rc, "data": data}
