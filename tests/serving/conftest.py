"""Fixtures of the serving tests: tiny recipe runs (their adapters randomised so routing moves the answers),
their reference models, and SuperNI requests of several tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.serving.loader import load_served
from serving_helpers import train_tiny_run
from tiny_models import tiny_model


@pytest.fixture(scope="session")
def runs(tiny_llama, superni, tmp_path_factory) -> dict[str, Path]:
    """Recipe runs of OrchMoE, Poly and a chat-template OrchMoE on 3 fixture tasks."""
    root = tmp_path_factory.mktemp("serve-runs")
    chat_model = root / "tiny-chat-llama"
    tok = make_tiny_tokenizer(chat_template=True)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(chat_model)
    tok.save_pretrained(chat_model)
    return {
        "orchmoe": train_tiny_run(tiny_llama, superni, root / "orch", "orchmoe"),
        "poly": train_tiny_run(tiny_llama, superni, root / "poly", "poly"),
        "chat": train_tiny_run(chat_model, superni, root / "chat", "orchmoe", "--chat-template"),
    }


@pytest.fixture(scope="session")
def references(runs):
    """Each run loaded a second time, for lone-generate references (never used by a server)."""
    return {name: load_served(run) for name, run in runs.items()}


@pytest.fixture(scope="session")
def task_requests(superni) -> list[dict]:
    """Structured requests (definition, input, one example) from every fixture task, two instances each."""
    out = []
    for f in sorted((superni / "tasks").glob("*.json")):
        task = json.loads(f.read_text())
        for inst in task["Instances"][:2]:
            ex = task["Positive Examples"][0]
            out.append({"task": f.stem, "definition": task["Definition"][0], "input": inst["input"],
                        "examples": [{"input": ex["input"], "output": ex["output"]}]})  # fmt: skip
    return out
