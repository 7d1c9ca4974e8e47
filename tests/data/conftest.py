"""Data tests read tables with ``datasets``: keep its cache inside the test's temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets``' Arrow cache in a per-session temporary folder instead of ~/.cache/huggingface."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    return datasets.config.HF_DATASETS_CACHE
