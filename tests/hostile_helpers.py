"""What the hostile-input probes share: running the CLI and judging its error line."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file

from orchmoe.cli import main
from recipe_helpers import SMALL_DATA, tiny_train_argv

# An error line that starts with an exception class name is an error the CLI did not expect.
_RAW_TYPE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b:")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``orchmoe ARGS``; argparse's own errors exit 2 as well."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(rc: int, err: str, message: str) -> None:
    """Exit code 2, one error line naming the problem, no traceback, no bare exception type."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        (
            "orchmoe train: error:",
            "orchmoe eval: error:",
            "orchmoe report: error:",
            "orchmoe analyze: error:",
            "orchmoe: error:",
        )
    ), err
    assert not _RAW_TYPE.match(line.split("error:", 1)[1].strip()), line
    assert message in line, f"{message!r} not in {line!r}"


def train_args(model: Path, data: Path, out: Path | str, *extra: str) -> list[str]:
    """A tiny run: 3 tasks x 8 instances, 6 steps of 4, checkpoints at steps 2 and 4, no evaluation."""
    return tiny_train_argv(
        model,
        data,
        out,
        *extra,
        **SMALL_DATA,
        checkpoint_every=2,
        max_steps=6,
        keep_checkpoints=3,
        log_every=1,
        eval=False,
    )


def adapter_of(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def same_adapter(a: Path, b: Path) -> bool:
    ta, tb = adapter_of(a), adapter_of(b)
    return set(ta) == set(tb) and all(bool((ta[k] == tb[k]).all()) for k in ta)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (to show nothing was lost or changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
