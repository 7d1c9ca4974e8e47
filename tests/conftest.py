"""Fixtures shared by the whole suite: the SuperNI-format data, tiny model folders, one-thread torch.

`tests/` is on the import path (``pythonpath`` in pyproject.toml), so the helper modules
(`core_helpers`, `tiny_models`, `helpers_tokenizer`, `recipe_helpers`) import by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny matrices gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting
# makes them several times slower.
torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
FIXTURE_SUPERNI = TESTS / "fixtures" / "superni"  # committed: 6 train-split + 2 test-split tasks
SHARED_SUPERNI = TESTS.parents[1] / "shared" / "superni"  # the 204 + 14 task subset beside the repository


@pytest.fixture(scope="session")
def superni() -> Path:
    """The small committed SuperNI excerpt (official layout): the suite passes from a clone alone."""
    return FIXTURE_SUPERNI


@pytest.fixture(scope="session")
def shared_superni() -> Path:
    """The larger SuperNI subset in ../shared/superni; tests needing it skip when it is absent."""
    if not (SHARED_SUPERNI / "tasks").is_dir():
        pytest.skip(f"the SuperNI subset is not at {SHARED_SUPERNI} (the repository's sibling shared/superni)")
    return SHARED_SUPERNI


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (model + tokenizer) that `--model DIR` loads."""
    from recipe_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    from recipe_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-t5", "t5")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test that builds an Accelerator with other settings
    (mixed precision) than an earlier test must not inherit it."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
