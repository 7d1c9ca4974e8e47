"""What the recipe tests share besides fixtures: the tasks they train on and tiny model folders."""

from __future__ import annotations

from pathlib import Path

from helpers_tokenizer import make_tiny_tokenizer
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
SEEN = ["task1426_country_independence_year", "task1318_country_national_dish", "task1582_bless_hypernym_generation"]
UNSEEN = "task645_summarization"


def save_tiny(path: Path, arch: str) -> Path:
    """A tiny random checkpoint folder (model + tokenizer) that `--model DIR` loads."""
    tok = make_tiny_tokenizer(add_eos=arch == "t5")
    tiny_model(arch, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
