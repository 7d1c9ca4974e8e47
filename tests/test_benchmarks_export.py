"""benchmarks/serve_vs_peft.py runs end to end at toy sizes (fresh adapters, and a trained run's adapter) and
prints its table; the bundle's LoRAs reproduce Poly's tokens through PEFT's mixed batch. Timings are not
checked here."""

from __future__ import annotations

import json

from orchmoe.cli import main
from recipe_helpers import SMALL_DATA, tiny_train_argv
from test_benchmarks import _run


def test_serve_vs_peft_fresh_and_trained(tiny_llama, superni, tmp_path):
    out = _run(
        "serve_vs_peft.py", "--model", str(tiny_llama), "--data", str(superni), "--tasks", "3", "--new-tokens", "4",
        "--reps", "1", "--threads", "1", "--json", str(tmp_path / "fresh.json"),
    )  # fmt: skip
    rows = json.loads((tmp_path / "fresh.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["poly", "orchmoe"] and "| poly (random weights) | poly | 3 | 3 |" in out
    assert rows[0]["rows_equal"] == 1.0 and rows[0]["speedup"] > 0
    run = tmp_path / "run"
    assert main([*tiny_train_argv(tiny_llama, superni, run, **SMALL_DATA, lr=None), "--method", "mhr",
                 "--max-steps", "1", "--no-eval"]) == 0  # fmt: skip
    out = _run("serve_vs_peft.py", "--run", str(run), "--tasks", "3", "--new-tokens", "3", "--reps", "1")
    assert "| run (trained) | mhr | 3 | 3 |" in out
