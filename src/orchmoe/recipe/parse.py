"""Reading a run's options from flags and a YAML/JSON file, with `transformers.HfArgumentParser`.

The file is read first and turned into flags placed before the command line's, so the command line wins
and both go through the same parser, types and checks. What the parser alone would let through is refused
here, each with one line naming it: an option given twice under two spellings (``lr`` and
``learning_rate``, or ``rank`` at the top of a file and under ``adapter:``), an unknown option (with the
closest names), a file that is not a mapping, and YAML anchors and aliases (a few hundred bytes of nested
aliases expand to gigabytes: a config never needs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from orchmoe.core.registry import METHODS
from orchmoe.recipe.args import (
    RECIPE_SET,
    ArgumentsError,
    DataArguments,
    EvalArguments,
    ModelArguments,
    OrchmoeTrainingArguments,
    adapter_config,
    method_arguments,
)
from orchmoe.utils.fileio import path_kind

__all__ = ["RunOptions", "TrainParser", "build_parser", "load_config_file", "parse_train_args", "yaml_error_line"]

_MAX_CONFIG_BYTES = 1 << 20
_MAX_DEPTH = 32


@dataclass
class RunOptions:
    """Every option of a training run, parsed and checked."""

    model: ModelArguments
    data: DataArguments
    eval: EvalArguments
    adapter: Any  # the method's options dataclass (`orchmoe.recipe.args.method_arguments`)
    training: OrchmoeTrainingArguments

    @property
    def generation_tokens(self) -> int:
        return self.eval.max_new_tokens or self.data.max_target_len


class _Help(argparse.HelpFormatter):
    """Help texts as written, with the default appended once, and only when there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "(default" not in text
            and action.default not in (None, argparse.SUPPRESS, False, [], "")
            and action.option_strings
        ):
            text += f" (default: {action.default})"
        return text


class TrainParser(HfArgumentParser):
    """HfArgumentParser whose own errors (a value of the wrong type, a missing value) are `ArgumentsError`s."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentsError(message)


def build_parser(method: str) -> HfArgumentParser:
    """The parser of ``orchmoe train`` for ``method`` (its own options in their own group)."""
    parser = TrainParser(
        [ModelArguments, DataArguments, EvalArguments, method_arguments(method), OrchmoeTrainingArguments],
        prog="orchmoe train",
        description="Train a routed adapter, save it and evaluate it (every option also in a --config YAML/JSON file).",
        formatter_class=_Help,
    )
    parser.add_argument(  # read before the others (parse_train_args); listed here for --help
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML or JSON file of options; flags override it"
    )
    return parser


# -- the config file -----------------------------------------------------------------------------
def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else " ".join(what.split())


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases, without a key given twice, and not nested deeper than `_MAX_DEPTH`."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a config", event.start_mark
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {_MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # a list or a mapping as a key
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be an option name, got a {type(key).__name__}", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options of a YAML or JSON file (YAML is a superset of JSON) as a flat mapping; an ``adapter:``
    section is merged into the top level (an option in both places is an error).

    Raises:
        ArgumentsError: missing, not a regular file, too large, not UTF-8, not YAML, not a mapping, an anchor.
    """
    p = Path(path)
    kind = path_kind(p)
    if kind is None:
        raise ArgumentsError(f"config file {str(p)!r} not found")
    if not p.is_file():
        raise ArgumentsError(f"config file {str(p)!r} is a {kind}, not a file")
    if p.stat().st_size > _MAX_CONFIG_BYTES:
        raise ArgumentsError(
            f"config file {p} is {p.stat().st_size:,} bytes: more than a config ({_MAX_CONFIG_BYTES:,})"
        )
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ArgumentsError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ArgumentsError(f"config file {p}: not valid YAML/JSON: {yaml_error_line(e)}") from None
    except RecursionError:
        raise ArgumentsError(f"config file {p}: nested too deeply") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ArgumentsError(f"config file {p}: the top level must be a mapping of option names to values")
    flat = {str(k): v for k, v in raw.items() if not str(k).startswith("_")}  # `_resolved`: informational
    section = flat.pop("adapter", None)
    if section is not None:
        if not isinstance(section, dict):
            raise ArgumentsError(f"config file {p}: 'adapter' must be a mapping of option names to values")
        for key, value in section.items():
            if str(key).replace("-", "_") in {k.replace("-", "_") for k in flat}:
                raise ArgumentsError(f"config file {p}: {key!r} is given twice (at the top and under 'adapter:')")
            flat[str(key)] = value
    return flat


# -- flags ---------------------------------------------------------------------------------------
def _dest_of(parser: argparse.ArgumentParser, option: str) -> str | None:
    action = parser._option_string_actions.get(option)  # noqa: SLF001 - argparse's own map of spellings
    return action.dest if action is not None else None


def _unknown(parser: argparse.ArgumentParser, option: str, where: str) -> ArgumentsError:
    name = option.lstrip("-").removeprefix("adapter.").replace("-", "_")
    if name in RECIPE_SET:
        return ArgumentsError(
            f"{where}: {option}: {name} is set from the data (the number of seen tasks); do not set it"
        )
    owners = sorted(m for m, cls in METHODS.items() if name in {f.name for f in dataclasses.fields(cls)})
    if owners:
        return ArgumentsError(
            f"{where}: {option} is not an option of this method (an option of {', '.join(owners)}); choose --method"
        )
    spellings = [s for s in parser._option_string_actions if s.startswith("--")]  # noqa: SLF001
    close = difflib.get_close_matches(option, spellings, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ArgumentsError(f"{where}: unknown option {option!r}{hint}")


def _check_given_once(parser: argparse.ArgumentParser, options: list[str], where: str, overrides: bool = True) -> None:
    """Refuse one option under two spellings (``--lr`` and ``--learning_rate``): which one wins would be an
    accident of their order. On a command line (``overrides``) the same name again (dashes or underscores, or its
    ``--no-`` form) is an override, as on any command line; in a file every option is given once."""
    seen: dict[str, str] = {}
    for option in options:
        dest = _dest_of(parser, option)
        if dest is None:
            raise _unknown(parser, option, where)
        if dest in seen and (not overrides or _family(seen[dest]) != _family(option)):
            raise ArgumentsError(f"{where}: {option} and {seen[dest]} set the same option ({dest}); give it once")
        seen[dest] = option


def _family(option: str) -> str:
    return option.lstrip("-").replace("-", "_").removeprefix("no_")


def _file_flags(parser: argparse.ArgumentParser, options: dict[str, Any], where: str) -> list[str]:
    """The file's options as flags (lists as several values, booleans as true/false)."""
    known = parser._option_string_actions  # noqa: SLF001
    keys = []
    for k in options:
        spellings = [f"--{k}", f"--{k.replace('-', '_')}", f"--{k.replace('_', '-')}"]
        keys.append(next((s for s in spellings if s in known), spellings[0]))
    _check_given_once(parser, keys, where, overrides=False)
    argv: list[str] = []
    for key, value in zip(keys, options.values()):
        if value is None or value == []:
            continue
        if isinstance(value, (dict, tuple, set)):
            raise ArgumentsError(f"{where}: {key[2:]} must be a single value or a list, got a {type(value).__name__}")
        action = known.get(key)
        if isinstance(value, list) and getattr(action, "nargs", None) not in ("+", "*"):
            raise ArgumentsError(f"{where}: {key[2:]} takes one value, got a list {value!r}")
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, (dict, list))]
        if bad:
            raise ArgumentsError(f"{where}: {key[2:]} must hold plain values, got {bad[0]!r}")
        argv += [key, *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def _cli_options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def parse_train_args(argv: list[str]) -> RunOptions:
    """All options of ``orchmoe train`` from ``argv`` (``--config FILE`` first, then the flags).

    Raises:
        ArgumentsError: any option that cannot be used, named.
        SystemExit: ``--help`` (after printing it).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    known, rest = pre.parse_known_args(argv)
    file_options = load_config_file(known.config) if known.config else {}
    method = known.method or file_options.get("method") or "orchmoe"
    if not isinstance(method, str) or method not in METHODS:
        where = "" if known.method else f"config file {known.config}: "
        close = difflib.get_close_matches(method, sorted(METHODS), n=1) if isinstance(method, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ArgumentsError(f"{where}unknown method {method!r}; choose one of {sorted(METHODS)}{hint}")
    parser = build_parser(method)
    file_argv = _file_flags(parser, file_options, f"config file {known.config}") if file_options else []
    if file_argv:  # the file alone first, so that a bad value in it is named with the file
        try:
            parser.parse_args_into_dataclasses(args=file_argv, return_remaining_strings=True)
        except (ValueError, TypeError) as e:
            raise ArgumentsError(f"config file {known.config}: {str(e).splitlines()[0]}") from None
    cli = [a for a in rest if a not in ("-h", "--help")]
    if len(cli) != len(rest):
        parser.print_help()
        raise SystemExit(0)
    cli_argv = (["--method", known.method] if known.method else []) + cli
    _check_given_once(parser, _cli_options(cli_argv), "command line")
    try:
        parsed = parser.parse_args_into_dataclasses(args=file_argv + cli_argv, return_remaining_strings=True)
    except ArgumentsError:
        raise
    except (ValueError, TypeError) as e:  # a __post_init__ of transformers' own (TrainingArguments)
        raise ArgumentsError(str(e).splitlines()[0]) from None
    *groups, remaining = parsed
    if remaining:
        raise _unknown(parser, remaining[0], "command line")
    model, data, evaluation, adapter, training = groups
    if model.method != method:
        raise ArgumentsError(f"--method {model.method} conflicts with the config file's method {method}")
    adapter_config(method, adapter, 1)  # the method's own checks, before anything is loaded
    return RunOptions(model=model, data=data, eval=evaluation, adapter=adapter, training=training)
