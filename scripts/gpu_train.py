"""Every `orchmoe train` run of the GPU check is built here, from scripts/gpu_check.yaml.

Why one place: the GPU check runs `orchmoe train` from two callers (tests/test_cuda.py and the quality
step of scripts/gpu_check.py), and the command line is about to change spelling (HfArgumentParser); the
options live in the YAML and the spelling rules in :func:`train_argv`, so that change is made once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().with_name("gpu_check.yaml")


def load_config(path: Path = CONFIG) -> dict:
    """The GPU check's runs (``cuda_tests``, ``methods``, ``quality``) as a dict.

    Raises:
        ValueError: a file that is not a mapping with those sections.
    """
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    missing = [k for k in ("cuda_tests", "methods", "quality") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: sections {missing} missing")
    return data


def train_argv(options: Mapping[str, Any]) -> list[str]:
    """``orchmoe train``'s arguments for ``options``, in their order.

    Args:
        options: option name (as ``orchmoe train --help`` spells it, without dashes) -> value; ``True`` is
            the flag, ``False`` its ``--no-`` form, ``None`` leaves the option out, a list is joined by commas.
    Returns:
        The argument list (without ``train``).
    """
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + str(name).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def train_command(python: str, options: Mapping[str, Any], *, prelude: str | None = None) -> list[str]:
    """The whole command: ``python -m orchmoe train ...``, or with ``prelude`` (Python code run first in the
    same process, e.g. to make kernels deterministic) ``python -c PRELUDE train ...``, where the prelude
    ends by running the ``orchmoe`` module (:data:`RUN_ORCHMOE`)."""
    if prelude is None:
        return [python, "-m", "orchmoe", "train", *train_argv(options)]
    return [python, "-c", prelude + "\n" + RUN_ORCHMOE, "train", *train_argv(options)]


#: The end of a prelude: ``python -m orchmoe`` with this process's remaining arguments.
RUN_ORCHMOE = 'import runpy, sys\nsys.argv[0] = "orchmoe"\nrunpy.run_module("orchmoe", run_name="__main__")'


def cuda_test_options(config: dict, *, dry: bool = False) -> dict:
    """The options of tests/test_cuda.py's recipe runs (``dry``: with its ``dry`` options laid over them)."""
    opts = dict(config["cuda_tests"])
    over = opts.pop("dry", {}) or {}
    return {**opts, **(over if dry else {})}


def quality_runs(config: dict, *, dry: bool = False) -> list[tuple[str, str, dict]]:
    """``(protocol, method, options)`` of every quality run, in order (``dry``: each protocol's ``dry``
    options laid over it); the caller adds --model, --data, --out and --seed."""
    q = config["quality"]
    runs = []
    for protocol, opts in q["protocols"].items():
        opts = dict(opts)
        over = opts.pop("dry", {}) or {}
        for method in q["methods"]:
            runs.append((protocol, method, {**config["methods"][method], **opts, **(over if dry else {})}))
    return runs
