"""Peak memory of one training step, for ``speed.py``.

On CUDA ``torch.cuda.max_memory_allocated`` over the allocation before the step. On CPU each method
runs in a fresh subprocess (``speed.py ... --probe METHOD``, whose entry is ``speed.probe_main``): the
peak RSS of the step over the RSS just before it, from /proc/self/status after resetting the high-water
mark, or the ``ru_maxrss`` delta where that is not possible.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_peak(step: Callable[[], object], device) -> tuple[float, str]:
    """(peak MiB of one call of ``step`` (a training step) over what was allocated before it, how it was measured)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda max_memory_allocated"
    if _reset_hwm() and _status_kb("VmHWM") is not None:
        before = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - before) / 1024, "VmHWM - VmRSS"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss delta (a lower bound)"


def probe_memory(script: Path, method: str, argv: list[str]) -> tuple[float | None, str]:
    """Run ``script argv --probe method`` in a fresh process (RSS high-water marks never come back down)."""
    cmd = [sys.executable, str(script), *argv, "--probe", method]
    # A fixed glibc mmap threshold: big tensors are unmapped when freed, so the RSS high-water mark follows the
    # live tensors (with the default dynamic threshold the same step measured 860 or 1,056 MiB from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("PROBE "):
            d = json.loads(line[6:])
            return d["peak_mb"], d["how"]
    print(f"memory probe for {method} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
    return None, "failed"


def probe_peaks(script: Path, methods: list[str], raw: list[str], args) -> tuple[dict, str | None]:
    """Memory first, each method in a fresh process (CPU): RSS high-water marks do not come back down."""
    mem_how, peaks = None, {}
    if not args.no_memory and torch.device(args.device).type == "cpu":
        for name in methods:
            peaks[name], mem_how = probe_memory(script, name, raw)
            print(f"  peak memory {name}: {peaks[name] if peaks[name] is None else round(peaks[name])} MiB", flush=True)
    return peaks, mem_how
