"""The README's Python examples run as written (SmolLM2-135M-Instruct, the default model, on CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 3 and "get_model" in blocks[0] and "Trainer(model=model" in "".join(blocks)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    from orchmoe.loading.gguf import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:  # scripts/setup.sh installs it; a bare `pip install orchmoe` may not have it
        pytest.skip(str(e))
    monkeypatch.chdir(tmp_path)  # the examples write my_adapter/, lora_task_1/, trainer_run/ where they run
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
