"""The docs that are written from code stay in step with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_methods_options_table_is_the_registrys():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "docs_methods.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
