"""`orchmoe train --data` end to end on the formats a Hugging Face user has (loader tests: tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchmoe.cli import main


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _instruction_rows(task: str, n: int) -> list[dict]:
    return [
        {"task": task, "instruction": f"Repeat the word ({task}).", "input": f"word {i}", "output": f"word {i}"}
        for i in range(n)
    ]


def _natural_instructions(root: Path) -> Path:
    """The layout of Muennighoff/natural-instructions: train/ and test/ folders, one row per reference."""
    for split, tasks in (("train", ["task001_copy", "task002_upper"]), ("test", ["task003_lower"])):
        for t in tasks:
            rows = [
                {
                    "task_name": t,
                    "id": f"{t}-{i}",
                    "definition": f"Do {t} to the input.",
                    "inputs": f"text {i}",
                    "targets": ref,
                }
                for i in range(10)
                for ref in (f"text {i}", f"TEXT {i}")
            ]
            _jsonl(root / split / f"{t}_{split}.jsonl", rows)
    return root


@pytest.mark.parametrize("kind", ["instruction-jsonl", "prompt-completion-parquet", "natural-instructions-folder"])
def test_train_on_each_data_format(kind, tiny_llama, tmp_path):
    unseen = ["--unseen-tasks", "0"]
    if kind == "instruction-jsonl":
        data = _jsonl(tmp_path / "train.jsonl", _instruction_rows("echo", 10) + _instruction_rows("again", 10))
    elif kind == "prompt-completion-parquet":
        import pandas as pd

        data = tmp_path / "pc" / "copy.parquet"
        data.parent.mkdir()
        pd.DataFrame({"prompt": [f"say {i}" for i in range(10)], "completion": [f"{i}" for i in range(10)]}).to_parquet(
            data
        )
    else:
        data, unseen = _natural_instructions(tmp_path / "ni"), ["--unseen-per-task", "4"]
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--train-per-task",
        "6",
        "--eval-per-task",
        "3",
        "--max-source-len",
        "64",
        "--max-target-len",
        "8",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
        "--out",
        str(out),
        *unseen,
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seen"]["overall"]["n"] == 3 * metrics["n_seen_tasks"] > 0
    if kind == "natural-instructions-folder":  # test/ holds the unseen tasks; both references are kept
        assert metrics["n_unseen_tasks"] == 1 and metrics["unseen"]["overall"]["n"] == 4
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert all(len(p["references"]) == 2 for p in preds)


def test_a_missing_column_names_the_file_and_the_columns(tiny_llama, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    assert (
        main(["train", "--model", str(tiny_llama), "--data", str(bad), "--out", str(tmp_path / "x"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "question" in err and "Traceback" not in err
