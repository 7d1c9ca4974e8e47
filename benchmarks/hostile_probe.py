"""A fresh hostile probe (issue 17): careless and hostile inputs to the CLI, config files, data formats, adapter
folders, the Python API, predict and export, and kills at random moments; each case judged automatically.

    python benchmarks/hostile_probe.py                  # every case, a table and the counts per class
    python benchmarks/hostile_probe.py --only predict   # the cases whose area or name holds a word
    python benchmarks/hostile_probe.py --json rows.json # also the rows as JSON

Classes: CLEAR (a clean error naming the problem: on the command line one ``orchmoe <cmd>: error: ...`` line,
exit 2, no traceback; in Python an exception whose text names it), SENSIBLE (it works and the result is right),
TRACEBACK (a raw traceback, a raw exception type or a text that does not name the problem), SILENT (it works
but the result is wrong or surprising), LOST (a user's file or a finished result destroyed), HANG (over the
case's time limit, or out of memory). Every case is new: none repeats tests/recipe/test_hostile*.py.

Cases run one by one in a forked child of this process (the libraries are imported once), in its own empty
folder, under a time limit and a memory limit; the kill cases start ``python -m orchmoe`` (or a small script)
and SIGKILL it. Tiny random models and the committed SuperNI excerpt keep the whole probe at a few minutes of
one CPU core. The cases are in `hostile_probe_cases.py` and `hostile_probe_kills.py` beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

CLASSES = ("CLEAR", "SENSIBLE", "TRACEBACK", "SILENT", "LOST", "HANG")
RAW_TYPES = (
    "TypeError",
    "AttributeError",
    "KeyError",
    "IndexError",
    "NameError",
    "UnicodeDecodeError",
    "RecursionError",
    "JSONDecodeError",
    "ArrowInvalid",
    "ArrowTypeError",
    "ArrowNotImplementedError",
    "ConstructorError",
    "UnpicklingError",
    "SafetensorError",
    "ZeroDivisionError",
    "AssertionError",
)
_RAW_LINE = re.compile(r"^(\w+\.)*(\w*(Error|Exception|Interrupt)|" + "|".join(RAW_TYPES) + r")\b:")
MEMORY_LIMIT = 6 << 30  # bytes of address space a case may take (a blow-up is a HANG, not a swapped machine)


@dataclass
class Case:
    area: str
    name: str
    fn: Callable
    timeout: float


CASES: list[Case] = []


def case(area: str, name: str, timeout: float = 90):
    """Register a case: ``fn(ctx) -> (class, detail)``."""

    def register(fn):
        CASES.append(Case(area, name, fn, timeout))
        return fn

    return register


# -- the fixtures every case reads (never changes: a case copies what it spoils) ------------------------------
@dataclass
class Ctx:
    root: Path  # the probe's work folder
    model: Path  # a tiny random Llama (model + tokenizer)
    data: Path  # the committed SuperNI excerpt
    run: Path  # a finished, evaluated OrchMoE run (2 steps, checkpoints at 1 and 2)
    poly: Path  # a finished Poly run
    tmp: Path = Path(".")  # the case's own empty folder (its working directory)

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"


def train_argv(ctx: Ctx, out, *extra: str, steps: int = 2, checkpoint_every: int = 0, evaluate: bool = False):
    from hostile_helpers import train_args

    args = train_args(ctx.model, ctx.data, out, "--max-steps", str(steps), "--checkpoint-every", str(checkpoint_every))
    return args + (["--eval"] if evaluate else []) + list(extra)


def build_fixtures(root: Path) -> Ctx:
    from recipe_helpers import save_tiny

    model = save_tiny(root / "tiny-llama", "llama")
    data = Path(shutil.copytree(REPO / "tests" / "fixtures" / "superni", root / "superni"))
    ctx = Ctx(root, model, data, root / "run-orchmoe", root / "run-poly")
    for out, method in ((ctx.run, "orchmoe"), (ctx.poly, "poly")):
        args = train_argv(ctx, out, "--method", method, checkpoint_every=1, evaluate=True)
        done = orchmoe_subprocess(args, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"the fixture run {out} failed:\n{done.stderr[-3000:]}")
    return ctx


def orchmoe_subprocess(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "orchmoe", *args], env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


# -- judging -------------------------------------------------------------------------------------------------
@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def last(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def cli(*args) -> CliResult:
    """``orchmoe ARGS`` in this process (stdout and stderr captured)."""
    from orchmoe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return CliResult(rc, out.getvalue(), err.getvalue())


def clear_cli(res: CliResult, *needles: str, accepted: str = "SILENT") -> tuple[str, str]:
    """CLEAR for one ``orchmoe CMD: error:`` line holding every needle, exit 2, no traceback; ``accepted`` when it
    succeeds; TRACEBACK otherwise."""
    line = res.last
    if res.rc == 0:
        return accepted, "accepted (exit 0)"
    text = line.split("error:", 1)[1].strip() if "error:" in line else line
    clean = (
        res.rc == 2
        and "Traceback" not in res.err
        and line.startswith("orchmoe")
        and "error:" in line
        and not _RAW_LINE.match(text)
    )
    missing = [n for n in needles if n not in line]
    if clean and not missing:
        return "CLEAR", line[:160]
    why = f"does not name {missing}" if clean else f"exit {res.rc}, raw"
    return "TRACEBACK", f"{why}: {line[:150]}"


def clear_raise(fn: Callable, *needles: str, accepted: str = "SILENT") -> tuple[str, str]:
    """CLEAR when ``fn()`` raises an exception whose text names every needle; ``accepted`` when it returns."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - what it raised is judged
        return judge_exception(e, *needles)
    return accepted, "accepted"


def judge_exception(e: BaseException, *needles: str) -> tuple[str, str]:
    """CLEAR when the exception's text names every needle (a raw type with no needle to check is TRACEBACK)."""
    if isinstance(e, MemoryError):
        return "HANG", "MemoryError"
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    missing = [n for n in needles if n not in str(e)]
    if not missing and (type(e).__name__ not in RAW_TYPES or needles):
        return "CLEAR", text[:160]
    return "TRACEBACK", (f"does not name {missing}: " if missing else "") + text[:150]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- running -------------------------------------------------------------------------------------------------
def _child(c: Case, ctx: Ctx, w: int) -> None:
    os.setpgid(0, 0)
    os.close(0)
    log = os.open(ctx.tmp.parent / f"{ctx.tmp.name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.chdir(ctx.tmp)
    try:
        verdict = c.fn(ctx)
    except MemoryError:
        verdict = ("HANG", "out of memory (MemoryError)")
    except BaseException as e:  # noqa: BLE001 - an exception the case did not expect: the library's raw one
        import traceback

        traceback.print_exc()
        verdict = ("TRACEBACK", f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
    os.write(w, json.dumps(list(verdict)).encode())
    os._exit(0)


def run_case(c: Case, ctx: Ctx) -> tuple[str, str, float]:
    tmp = ctx.root / "cases" / f"{c.area}-{c.name}"
    tmp.mkdir(parents=True)
    r, w = os.pipe()
    start = time.monotonic()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(c, Ctx(ctx.root, ctx.model, ctx.data, ctx.run, ctx.poly, tmp), w)
    os.close(w)
    data = b""
    deadline = start + c.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "HANG", f"over {c.timeout:.0f} s", time.monotonic() - start
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # whatever the case left running
    took = time.monotonic() - start
    if not data:
        return "HANG", f"the case's process died (status {status}, out of memory?)", took
    cls, detail = json.loads(data)
    return cls, detail, took


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run the cases whose area or name holds this word (comma-separated words)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    import hostile_probe_cases  # noqa: F401  (registers the cases)
    import hostile_probe_kills  # noqa: F401
    import orchmoe.cli  # noqa: F401  (import once here: every forked case shares it)

    words = [w for w in (args.only or "").split(",") if w]
    chosen = [c for c in CASES if not words or any(w in c.area or w in c.name for w in words)]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="orchmoe-probe-"))
    if args.keep:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        ctx = build_fixtures(root)
        print(f"fixtures in {time.monotonic() - t0:.0f} s; {len(chosen)} cases\n", flush=True)
        print("| area | case | class | detail | s |\n|---|---|---|---|---|", flush=True)
        rows = []
        for c in chosen:
            cls, detail, took = run_case(c, ctx)
            rows.append({"area": c.area, "case": c.name, "class": cls, "detail": detail, "seconds": round(took, 1)})
            print(f"| {c.area} | {c.name} | {cls} | {detail.replace('|', '/')} | {took:.1f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    counts = {k: sum(r["class"] == k for r in rows) for k in CLASSES}
    print(f"\n{len(rows)} cases in {time.monotonic() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    bad = [r for r in rows if r["class"] not in ("CLEAR", "SENSIBLE")]
    for r in bad:
        print(f"  {r['class']:9} {r['area']}/{r['case']}: {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    import hostile_probe  # the cases register with the module they import, not with __main__

    sys.exit(hostile_probe.main())
