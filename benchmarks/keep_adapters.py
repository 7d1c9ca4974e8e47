"""Keep what later analyses need of finished benchmark runs, small enough to commit: no retraining later.

    python benchmarks/keep_adapters.py runs/quality-cpu-long runs/quality-cpu-long-frozen

copies, for every finished run folder (one with ``metrics.json``) under each root, its final adapter and
the files that describe and score it -- ``adapter/``, ``config.yaml``, ``train_summary.json``,
``train_log.jsonl``, ``metrics.json``, ``metrics.md``, ``predictions.jsonl`` and `unseen_eval.py`'s
``unseen14/results.json`` when there is one -- into ``benchmarks/results/adapters/<size>/<run>/``, where
``<size>`` is the root's name without ``quality-`` (``cpu-long``, ``cpu-long-frozen``). Checkpoints are
left behind. A copy is a run folder to `unseen_eval.py` and `paired_stats.py`.

``benchmarks/results/adapters`` is ignored on ``main`` and is a worktree of the orphan branch
``bench-adapters`` (``git worktree add benchmarks/results/adapters bench-adapters``), where kept runs are
committed: ~1.8 MB an adapter would soon push main's tree, which the GPU check sends with every device call
(64 MiB a call), over that limit (``scripts/gpu_bundle.sh`` checks it).

Each run is copied into a temporary folder and renamed into place; a run already kept with the same
adapter only has its other files refreshed (e.g. a results file added since); a different adapter under
the same name is an error unless ``--overwrite``. Prints each run's size and the total.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unseen_eval import RESULTS, adapter_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "benchmarks" / "results" / "adapters"
FILES = ("config.yaml", "train_summary.json", "train_log.jsonl", "metrics.json", "metrics.md", "predictions.jsonl")


class KeepError(ValueError):
    """A folder that cannot be kept as asked; the message names it."""


def size_name(root: Path) -> str:
    """``quality-cpu-long`` -> ``cpu-long``: the protocol the runs under a benchmark root belong to."""
    return root.name.removeprefix("quality-")


def finished_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` whose training and evaluation finished (``root`` itself if it is one)."""
    if (root / "config.yaml").is_file():
        return [root] if (root / "metrics.json").is_file() else []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and (p / "metrics.json").is_file() and (p / "adapter").is_dir()
    )


def _wanted(run: Path, results_name: str) -> list[Path]:
    """Paths (relative to the run) to keep."""
    out = [Path("adapter") / p.name for p in sorted((run / "adapter").iterdir()) if p.is_file()]
    out += [Path(f) for f in FILES if (run / f).is_file()]
    if (run / results_name / RESULTS).is_file():
        out.append(Path(results_name) / RESULTS)
    return out


def _copy_file(src: Path, dst: Path) -> None:
    """Copy through a temporary file beside ``dst``, renamed over it: never a half-written file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def keep_run(run: Path, dest: Path, *, results_name: str = "unseen14", overwrite: bool = False) -> int:
    """Copy one run into ``dest`` (a new folder, or refresh one holding the same adapter); returns its bytes."""
    files = _wanted(run, results_name)
    if dest.exists():
        if not (dest / "adapter").is_dir():
            raise KeepError(f"{dest} exists but holds no adapter: not a kept run, leaving it alone")
        if adapter_digest(dest) != adapter_digest(run) and not overwrite:
            raise KeepError(f"{dest} holds another adapter than {run}; pass --overwrite to replace it")
        if adapter_digest(dest) != adapter_digest(run):
            for p in (dest / "adapter").iterdir():
                p.unlink()
        for rel in files:
            _copy_file(run / rel, dest / rel)
    else:
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel in files:
                _copy_file(run / rel, tmp / rel)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sum((dest / rel).stat().st_size for rel in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="benchmark roots (folders of run folders) or run folders")
    ap.add_argument(
        "--dest", default=str(DEFAULT_DEST), help="where kept runs go (default benchmarks/results/adapters)"
    )
    ap.add_argument("--size", default=None, help="size folder name (default: each root's name without quality-)")
    ap.add_argument("--results-name", default="unseen14", help="unseen_eval.py's folder name to keep too")
    ap.add_argument("--overwrite", action="store_true", help="replace a kept run whose adapter differs")
    args = ap.parse_args(argv)
    roots = [Path(r) for r in args.roots]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        ap.error(f"not a folder: {', '.join(missing)}")
    total, n = 0, 0
    try:
        for root in roots:
            runs = finished_runs(root)
            parent = root.parent if (root / "config.yaml").is_file() else root
            for run in runs:
                dest = Path(args.dest) / (args.size or size_name(parent)) / run.name
                size = keep_run(run, dest, results_name=args.results_name, overwrite=args.overwrite)
                total, n = total + size, n + 1
                print(f"{run} -> {dest} ({size / 2**20:.2f} MiB)", flush=True)
    except KeepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kept {n} run(s), {total / 2**20:.1f} MiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
