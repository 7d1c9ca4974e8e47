"""The kill cases of `hostile_probe.py`: SIGKILL at a random moment of `orchmoe train` (checkpointing, the final
save), of saving an adapter over an existing one (`save_adapter` and PEFT's ``save_pretrained``), of `orchmoe
export --overwrite` and of `orchmoe predict`; then the folder must be the old one or the new one and the next
command must recover. A case that cannot recover is LOST; one that recovers to another result is SILENT."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from hostile_probe import REPO, Ctx, case, cli, train_argv

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
STEPS = 24


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """Poll ``ready()`` every 2 ms until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; True when the process was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def _train_args(ctx: Ctx, out: Path) -> list[str]:
    return train_argv(ctx, out, "--method", "orchmoe", steps=STEPS, checkpoint_every=2)


def _reference(ctx: Ctx) -> Path:
    """The unbroken run the resumed ones must equal (made by the first kill case that needs it)."""
    ref = ctx.root / "kill-reference"
    if not (ref / "train_summary.json").is_file():
        res = cli(*_train_args(ctx, ref))
        assert res.rc == 0, res.err[-2000:]
    return ref


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _recovers(ctx: Ctx, run: Path, what: str) -> tuple[str, str]:
    """The same command again: it must finish, equal the reference bit for bit, with one log record a step."""
    from orchmoe.recipe.run_folder import RunFolder

    ref = _reference(ctx)
    res = cli(*_train_args(ctx, run))
    if res.rc != 0:
        return "LOST", f"{what}; the same command then failed: {res.last[:120]}"
    a, b = _adapter(run), _adapter(ref)
    same = set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)
    steps = [r["step"] for r in RunFolder(run).read_log() if "loss" in r]
    if not same:
        return "SILENT", f"{what}; resumed to another adapter than the unbroken run's"
    if steps != sorted(set(steps)):
        return "SILENT", f"{what}; the log repeats steps {steps}"
    leftovers = [p.name for p in run.rglob(".*partial*")] + [p.name for p in run.rglob(".*.tmp-*")]
    if leftovers:
        return "SILENT", f"{what}; recovered but left {leftovers[:3]}"
    return "SENSIBLE", f"{what}; resumed bit-exact"


def _train_kill(ctx: Ctx, seed: int, ready_of) -> tuple[str, str]:
    rng = random.Random(seed)
    run = ctx.tmp / "run"
    proc = _popen(["-m", "orchmoe", *_train_args(ctx, run)])
    ready, what = ready_of(run, rng)
    if not _wait_for(proc, ready):
        _kill(proc)
        return "SENSIBLE", f"finished before the kill ({what})"
    time.sleep(rng.uniform(0, 0.05))
    killed = _kill(proc)
    return _recovers(ctx, run, f"killed {what}" if killed else f"finished before the kill ({what})")


def _in_checkpoint(run: Path, rng: random.Random):
    n = 2 * rng.randint(1, STEPS // 2 - 1)
    return (lambda: (run / f"checkpoint-{n}").is_dir()), f"while checkpoint-{n} was written"


for _seed in (1, 2, 3):

    @case("kill", f"train-while-checkpointing-{_seed}", timeout=240)
    def _(ctx, seed=_seed):
        return _train_kill(ctx, seed, _in_checkpoint)


@case("kill", "train-in-the-final-save", timeout=240)
def _(ctx):
    def ready_of(run, rng):
        return (lambda: any(run.glob(".adapter.partial-*")) or (run / "adapter").is_dir()), "in the final save"

    return _train_kill(ctx, 4, ready_of)


_SAVER = """
import sys, torch
from orchmoe import load_adapter, save_adapter
from orchmoe.loading.pretrained import load_model_and_tokenizer
model_dir, adapter, dest, how = sys.argv[1:5]
model = load_adapter(load_model_and_tokenizer(model_dir)[0], adapter, is_trainable=True)
params = list(model.base_model.adapter_state_dict().values())
save = (lambda: save_adapter(model, dest)) if how == "save_adapter" else (lambda: model.save_pretrained(dest))
save()
print("ready", flush=True)
while True:
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    save()
"""


def _save_kills(ctx: Ctx, how: str, trials: int) -> tuple[str, str]:
    """Kill a loop of saves over one folder ``trials`` times; the folder must load every time."""
    from orchmoe import load_adapter
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    rng = random.Random(how)
    lost, stale = [], []
    for t in range(trials):
        dest = ctx.tmp / f"adapter-{t}"
        proc = _popen(["-c", _SAVER, str(ctx.model), str(ctx.adapter), str(dest), how])
        if proc.stdout.readline().strip() != "ready":
            _kill(proc)
            return "TRACEBACK", f"the saving script failed ({how})"
        time.sleep(rng.uniform(0.05, 1.5))
        _kill(proc)
        try:
            load_adapter(load_model_and_tokenizer(str(ctx.model))[0], dest)
        except Exception as e:  # noqa: BLE001 - what the kill left is judged
            lost.append(f"{type(e).__name__}: {str(e)[:90]}")
        stale += [p.name for p in ctx.tmp.glob(f".{dest.name}*")]
    if lost:
        return "LOST", f"{len(lost)}/{trials} kills of {how} left an adapter that does not load ({lost[0]})"
    return "SENSIBLE", f"{trials} kills of {how}: the old or the new adapter each time" + (
        f" ({len(stale)} hidden stages left for the next save to sweep)" if stale else ""
    )


@case("kill", "save-adapter-over-an-adapter", timeout=300)
def _(ctx):
    return _save_kills(ctx, "save_adapter", 6)


@case("kill", "peft-save-pretrained-over-an-adapter", timeout=300)
def _(ctx):
    return _save_kills(ctx, "save_pretrained", 8)


@case("kill", "export-overwrite", timeout=300)
def _(ctx):
    from peft import PeftConfig
    from safetensors.torch import load_file

    rng = random.Random(5)
    dest = ctx.tmp / "lora"
    first = cli("export", ctx.run, "--out", dest, "--abstract-task", "0", "--device", "cpu")
    if first.rc != 0:
        return "TRACEBACK", first.last[:150]
    broken = 0
    for _ in range(3):
        proc = _popen(["-m", "orchmoe", "export", str(ctx.run), "--out", str(dest), "--abstract-task", "1",
                       "--overwrite", "--device", "cpu"])  # fmt: skip
        _wait_for(proc, lambda: any(ctx.tmp.glob(".lora.partial-*")), timeout=60)
        time.sleep(rng.uniform(0, 0.05))
        _kill(proc)
        try:
            PeftConfig.from_pretrained(str(dest))
            load_file(str(dest / "adapter_model.safetensors"))
        except Exception:  # noqa: BLE001
            broken += 1
    again = cli("export", ctx.run, "--out", dest, "--abstract-task", "1", "--overwrite", "--device", "cpu")
    left = [p.name for p in ctx.tmp.glob(".lora*")]
    if broken:
        return "LOST", f"{broken}/3 kills left an export folder PEFT cannot read"
    if again.rc != 0 or left:
        return "TRACEBACK", f"the next export: exit {again.rc} {again.last[:80]}, left {left}"
    return "SENSIBLE", "3 kills: the old export or the new one each time; the next export recovers"


@case("kill", "predict-then-resume", timeout=300)
def _(ctx):
    rows = [{"definition": "Say the year.", "input": f"country {i}", "id": i} for i in range(40)]
    inp = ctx.tmp / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = cli("predict", ctx.run, "--input", inp, "--output", ctx.tmp / "ref.jsonl", "--no-progress")
    if ref.rc != 0:
        return "TRACEBACK", ref.last[:150]
    out = ctx.tmp / "out.jsonl"
    journal = ctx.tmp / ".out.jsonl.partial"
    proc = _popen(["-m", "orchmoe", "predict", str(ctx.run), "--input", str(inp), "--output", str(out),
                   "--no-progress", "--max-batch", "2"])  # fmt: skip
    started = _wait_for(proc, lambda: journal.is_file() and journal.read_text().count("\n") >= 3)
    time.sleep(random.Random(6).uniform(0, 0.2))
    killed = _kill(proc) and started
    again = cli("predict", ctx.run, "--input", inp, "--output", out, "--no-progress")
    if again.rc != 0:
        return "LOST", f"the resumed predict failed: {again.last[:120]}"
    same = out.read_text() == (ctx.tmp / "ref.jsonl").read_text()
    what = "killed mid-way" if killed else "finished before the kill"
    return ("SENSIBLE", f"{what}; resumed to the same answers") if same else ("SILENT", f"{what}; other answers")
