"""`orchmoe report RUN [RUN...]`: one Markdown comparison of finished runs.

Reads each run folder's ``metrics.json`` (written by training or `orchmoe eval`) and puts the
runs side by side: method, trainable parameters, training time, seen-task ROUGE-L / ROUGE-Lsum /
ROUGE-1 / exact match, unseen-task ROUGE-L / ROUGE-Lsum / exact match; then ROUGE-L per task
category. Runs scored on different tasks are not comparable: the report says so above the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from orchmoe.recipe.run_folder import RunFolder
from orchmoe.utils.fileio import atomic_write_text, check_replaceable, path_kind
from orchmoe.utils.markdown import markdown_table

__all__ = ["load_run", "build_report", "write_report"]

_REPORT_HEAD = b"## Runs\n"  # how every report begins (`build_report`)


def load_run(run_dir: str | os.PathLike) -> dict:
    """A run's metrics.json (with its folder path added); a clear error when it was never evaluated."""
    run = RunFolder(run_dir).require_existing()
    metrics = run.read_metrics()
    if metrics.get("train_seconds") is None:
        summary = run.read_summary()
        metrics["train_seconds"] = summary.get("train_seconds")
        metrics["train_steps"] = summary.get("steps")
    metrics["_path"] = str(run.path)
    return metrics


def _task_sets(runs: Sequence[dict]) -> list[str]:
    """Warnings when the runs were scored on different seen or unseen tasks."""
    notes = []
    for part in ("seen", "unseen"):
        sets = {r["_path"]: frozenset(r.get(part, {}).get("per_task", {})) for r in runs}
        if len(set(sets.values())) > 1:
            first = next(iter(sets.values()))
            odd = [p for p, s in sets.items() if s != first]
            notes.append(
                f"**Warning**: the runs were scored on different {part} tasks ({', '.join(odd)} differ from "
                f"{next(iter(sets))}); their {part} scores are not comparable."
            )
    return notes


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _labels(runs: Sequence[dict]) -> list[str]:
    """Folder names, or the paths as given when two runs share a folder name."""
    names = [Path(r["_path"]).name for r in runs]
    if len(set(names)) < len(names):
        return [r["_path"] for r in runs]
    return names


def _metric(run: dict, part: str, key: str) -> float | None:
    return run.get(part, {}).get("overall", {}).get(key)


def build_report(run_dirs: Sequence[str | os.PathLike]) -> str:
    """The comparison table and the per-category ROUGE-L table, as Markdown."""
    if not run_dirs:
        raise ValueError("report needs at least one run folder")
    runs = [load_run(r) for r in run_dirs]
    labels = _labels(runs)
    headers = [
        "run",
        "method",
        "trainable params",
        "train time",
        "seen ROUGE-L",
        "seen ROUGE-Lsum",
        "seen ROUGE-1",
        "seen EM",
        "unseen ROUGE-L",
        "unseen ROUGE-Lsum",
        "unseen EM",
    ]
    rows = []
    for label, r in zip(labels, runs):
        rows.append(
            [
                label,
                r.get("method"),
                f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") is not None else None,
                _duration(r.get("train_seconds")),
                _metric(r, "seen", "rougeL"),
                _metric(r, "seen", "rougeLsum"),
                _metric(r, "seen", "rouge1"),
                _metric(r, "seen", "exact_match"),
                _metric(r, "unseen", "rougeL"),
                _metric(r, "unseen", "rougeLsum"),
                _metric(r, "unseen", "exact_match"),
            ]
        )
    align = ["l", "l", "r"] + ["r"] * 8
    models = sorted({str(r.get("base_model")) for r in runs})
    parts = [
        "## Runs",
        "",
        f"Base model: {', '.join(models)}. Scores x100 (official SuperNI metrics); "
        "seen = held-out instances of the training tasks, unseen = test-split tasks.",
        "",
        *[n + "\n" for n in _task_sets(runs)],
        markdown_table(headers, rows, align),
    ]
    cats: dict[tuple[str, str], list] = {}
    for i, r in enumerate(runs):
        for part in ("seen", "unseen"):
            for cat, s in r.get(part, {}).get("per_category", {}).items():
                cats.setdefault((part, cat), [None] * len(runs))[i] = s.get("rougeL")
    if cats:
        cat_rows = [[cat, part, *vals] for (part, cat), vals in sorted(cats.items())]
        parts += [
            "",
            "## ROUGE-L per category",
            "",
            markdown_table(["category", "tasks", *labels], cat_rows, ["l", "l"] + ["r"] * len(labels)),
        ]
    return "\n".join(parts) + "\n"


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> str:
    """Build the report, print it, and write it to `out` when given."""
    if out is not None:
        _check_report_out(Path(out))
    text = build_report(run_dirs)
    print(text, end="")
    if out is not None:
        path = Path(out)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        print(f"report written to {path}")
    return text


def _check_report_out(path: Path) -> None:
    """``--out`` may be a new file or an earlier report (it starts with ``## Runs``): never a user's file, nor
    another file of a run folder (its metrics.json, its config.yaml), which a mistyped ``--out`` would destroy."""
    kind = path_kind(path)
    if kind == "folder":
        raise IsADirectoryError(f"report output {path} is a directory; name a file")
    if kind is None:
        return
    check_replaceable(path)
    with open(path, "rb") as fh:
        head = fh.read(len(_REPORT_HEAD))
    if head != _REPORT_HEAD:
        raise FileExistsError(
            f"report output {path} exists and is not an earlier report: orchmoe replaces only its own reports; "
            "choose another --out (or remove the file)"
        )
