"""Fixtures of the data tests: a tiny tokenizer, a task factory, and ``datasets``' cache kept inside the
test's temporary folder."""

from __future__ import annotations

import pytest

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.data import SuperNITask


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets``' Arrow cache in a per-session temporary folder instead of ~/.cache/huggingface."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    return datasets.config.HF_DATASETS_CACHE


def _make_task(definition="Reverse the word.", n_pos=3, pos_len=1):
    examples = [
        {"input": f" word{i} " + "filler " * (pos_len - 1), "output": f" out{i} ", "explanation": "because"}
        for i in range(1, n_pos + 1)
    ]
    return SuperNITask(
        name="t",
        definition=definition,
        positive_examples=examples,
        categories=["Misc."],
        instances=[{"id": "t-0", "input": "abc", "output": ["cba"]}],
    )


@pytest.fixture(scope="module")
def tok():
    """The tiny word-level tokenizer of the data tests."""
    return make_tiny_tokenizer()


@pytest.fixture
def make_task():
    """A factory of small SuperNI tasks: ``make_task(definition=..., n_pos=..., pos_len=...)``."""
    return _make_task
