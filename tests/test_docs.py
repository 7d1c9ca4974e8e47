"""The docs that are written from code stay in step with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_methods_options_table_is_the_registrys():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "docs_methods.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_test_the_docs_cite_exists():
    """``tests/x/test_y.py::test_z`` in the docs names a test that is there (a moved test updates its citations)."""
    cited = set()
    for doc in [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")]:
        cited |= set(re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", doc.read_text(encoding="utf-8")))
    assert cited
    missing = [f"{path}::{name}" for path, name in sorted(cited) if not (REPO / path).is_file()]
    missing += [
        f"{path}::{name}"
        for path, name in sorted(cited)
        if name and (REPO / path).is_file() and f"def {name}(" not in (REPO / path).read_text(encoding="utf-8")
    ]
    assert not missing, f"the docs cite tests that do not exist: {missing}"
