"""Shared pieces of the recipe tests (train, evaluate, CLI): the SuperNI tasks they use and tiny model folders.

Test modules import the fixtures by name (`from recipe_helpers import superni, tiny_llama`), which is how
pytest finds fixtures outside a conftest.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_tokenizer import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SUPERNI = REPO.parent / "shared" / "superni"
SEEN = ["task1426_country_independence_year", "task1318_country_national_dish", "task1582_bless_hypernym_generation"]
UNSEEN = "task645_summarization"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core box thrashes with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def superni() -> Path:
    if not (SUPERNI / "tasks").is_dir():
        pytest.fail(f"the SuperNI subset is missing: expected {SUPERNI}/tasks (the repository's sibling shared/superni)")
    return SUPERNI


def save_tiny(path: Path, arch: str) -> Path:
    """A tiny random checkpoint folder (model + tokenizer) that `--model DIR` loads."""
    from orchmoe.models import tiny_model

    tok = make_tiny_tokenizer(add_eos=arch == "t5")
    tiny_model(arch, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-t5", "t5")
