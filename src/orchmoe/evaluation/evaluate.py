"""Scoring a set of predictions: the official SuperNI scores per example, aggregated per task, category and
split, and the Markdown tables of the result."""

from __future__ import annotations

from typing import Any

from orchmoe.evaluation.metrics import aggregate, score_example
from orchmoe.utils.markdown import markdown_table

__all__ = ["format_metrics_markdown", "score_predictions"]


def score_predictions(examples, predictions: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """(one record per example with its scores, the aggregate: overall / seen / unseen, per task and category).

    Args:
        examples: the evaluated `orchmoe.data.Example`s (task, category, seen, id, input, references).
        predictions: the text predicted for each, in order.
    """
    records = []
    for ex, p in zip(examples, predictions):
        s = score_example(p, list(ex.references))  # each scored once
        records.append(
            {"task": ex.task, "category": ex.category, "seen": ex.seen, "id": ex.id, "input": ex.input,
             "prediction": p, "references": list(ex.references), "scores": s}
        )  # fmt: skip
    agg = aggregate([{**r, "pred": r["prediction"], "refs": r["references"]} for r in records])
    return records, agg


def _row(scores: dict) -> list:
    return [scores["n"], scores["rougeL"], scores.get("rougeLsum"), scores["rouge1"], scores["exact_match"]]


def format_metrics_markdown(metrics: dict, *, per_task: bool = True) -> str:
    """The summary (all / seen / unseen), per-category and per-task tables."""
    title = f"## {metrics.get('run', 'run')}: {metrics.get('method', '?')} on {metrics.get('base_model', '?')}"
    summary_rows = [["all", *_row(metrics["overall"])]]
    for part, label in (("seen", "seen tasks (held-out instances)"), ("unseen", "unseen tasks")):
        if part in metrics:
            summary_rows.append([label, *_row(metrics[part]["overall"])])
    parts = [title, "", markdown_table(["split", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], summary_rows)]
    cat_rows = []
    for part in ("seen", "unseen"):
        for cat, s in metrics.get(part, {}).get("per_category", {}).items():
            cat_rows.append([cat, part, *_row(s)])
    if cat_rows:
        parts += [
            "",
            "### Per category",
            "",
            markdown_table(["category", "tasks", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], cat_rows),
        ]
    if per_task:
        task_rows = []
        for part in ("seen", "unseen"):
            for task, s in metrics.get(part, {}).get("per_task", {}).items():
                task_rows.append([task, metrics.get("categories", {}).get(task, "?"), part, *_row(s)])
        if task_rows:
            parts += [
                "",
                "### Per task",
                "",
                markdown_table(["task", "category", "tasks", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], task_rows),
            ]
    return "\n".join(parts) + "\n"
