"""Option values from text, YAML or Python: coerced by a field's type annotation (int, float, bool, str,
optional, mapping), checked against its bounds and choices (finite, in range), plus the parsers of the
values that are not plain types (task selections, target modules). Errors name the option."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Any

__all__ = [
    "TrainConfigError",
    "coerce_value",
    "none_word",
    "as_bool",
    "parse_tasks",
    "parse_unseen",
    "parse_count_or_all",
    "parse_folder",
    "parse_target_modules",
]


class TrainConfigError(ValueError):
    """A training option that cannot be used (unknown key, wrong type, out of range, impossible combination)."""


def none_word(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null"))


def parse_tasks(name: str, v: Any) -> int | list[str] | str:
    """A task selection: a count, 'all', a list of names, or a string (names, a file, a split) left to the loader."""
    if isinstance(v, bool) or v is None:
        raise TrainConfigError(f"{name} must be a number, 'all', names or a file, got {v!r}")
    if isinstance(v, int):
        if v < 1:
            raise TrainConfigError(f"{name} must be >= 1, got {v}")
        return v
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    s = str(v).strip()
    if s.isdigit():
        return parse_tasks(name, int(s))
    if not s:
        raise TrainConfigError(f"{name} is empty")
    return s


def parse_unseen(name: str, v: Any) -> int | list[str] | str:
    if none_word(v) or (isinstance(v, str) and v.strip().lower() == "all"):
        return "all"
    if isinstance(v, int) and not isinstance(v, bool) and v == 0:
        return 0
    if isinstance(v, str) and v.strip() == "0":
        return 0
    return parse_tasks(name, v)


def parse_count_or_all(name: str, v: Any) -> int | None:
    if none_word(v) or (isinstance(v, str) and v.strip().lower() == "all"):
        return None
    n = _as_int(name, v)
    if n < 0:
        raise TrainConfigError(f"{name} must be >= 0 or 'all', got {n}")
    return n


def parse_folder(name: str, v: Any) -> str:
    """A folder path; empty (an unset shell variable) is an error rather than the current directory."""
    if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)):
        raise TrainConfigError(f"{name} must be a folder path, got {v!r}")
    s = os.fspath(v)
    if not s.strip():
        raise TrainConfigError(f"{name} is empty; name a run folder (use '.' to mean the current directory)")
    return s


_NAMES = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")


def parse_target_modules(name: str, v: Any) -> list[str] | str | None:
    """Comma-separated leaf names become a list; anything else is one regex over module paths (checked)."""
    if none_word(v):
        return None
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    s = str(v).strip()
    if _NAMES.fullmatch(s):
        return [x.strip() for x in s.split(",")]
    try:
        re.compile(s)
    except re.error as e:
        raise TrainConfigError(
            f"{name} {s!r} is neither comma-separated names nor a valid regular expression: {e}"
        ) from None
    return s


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise TrainConfigError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise TrainConfigError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise TrainConfigError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise TrainConfigError(f"{name} must be a finite number, got {v!r}")
    return x


def as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return v.strip().lower() in ("true", "yes", "1", "on")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise TrainConfigError(f"{name} must be true or false, got {v!r}")


def _as_str(name: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise TrainConfigError(f"{name} must be a string, got {v!r}")
    return str(v)


_BASE = {"int": _as_int, "float": _as_float, "bool": as_bool, "str": _as_str}


def _in_range(name: str, x: Any, meta: dict) -> None:
    for key, ok, words in (
        ("ge", lambda a, b: a >= b, ">="),
        ("gt", lambda a, b: a > b, ">"),
        ("lt", lambda a, b: a < b, "<"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(x, bound):
            raise TrainConfigError(f"{name} must be {words} {bound:g}, got {x!r}")


def coerce_value(f: dataclasses.Field, v: Any, name: str | None = None) -> Any:
    """``v`` as field ``f``'s type (from its annotation), checked against its bounds and choices.

    Works for `TrainConfig` fields and, without bounds, for any dataclass field (the adapter configs).
    """
    name = name or f.name
    meta = dict(f.metadata)
    if meta.get("parse"):
        return meta["parse"](name, v)
    kinds = [k.strip() for k in str(f.type).split("|")]
    if "None" in kinds and none_word(v):
        return None
    base = next((k for k in kinds if k != "None"), "Any")
    if base == "dict":
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise TrainConfigError(f"{name} must be a mapping of option names to values, got {v!r}")
        return {str(k).replace("-", "_"): x for k, x in v.items()}
    if base not in _BASE:
        return v
    x = _BASE[base](name, v)
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None:
        x = x.lower()
        if x not in choices:
            close = difflib.get_close_matches(x, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainConfigError(f"{name} must be one of {list(choices)}, got {x!r}{hint}")
    if base in ("int", "float"):
        _in_range(name, x, meta)
    return x
