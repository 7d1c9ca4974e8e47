"""The `orchmoe` command: train, eval, report, analyze.

    orchmoe train --method orchmoe --data path/to/natural-instructions --tasks 100 \\
        --train-per-task 1000 --eval-per-task 100 --out runs/orch
    orchmoe train --config my.yaml --lr 3e-4          # flags override the file
    accelerate launch -m orchmoe train ...           # several processes / GPUs
    orchmoe eval runs/orch
    orchmoe report runs/orch runs/poly runs/lora --out report.md
    orchmoe analyze runs/orch

Every `train` flag is a field of `orchmoe.train.TrainConfig`; a YAML/JSON config file uses the
same names (dashes or underscores).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import yaml

from . import __version__

__all__ = ["main", "build_parser", "train_config_from_args"]

_ALIASES = {"grad_accum": ["--gradient-accumulation-steps"], "lr": ["--learning-rate"], "out": ["--output-dir"],
            "data": ["--data-dir"], "n_pos": ["--num-pos-examples"]}


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .config import METHODS
    from .train import TrainConfig

    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (names as below); flags override it")
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        section = ("model and method" if f.name in ("model", "dtype", "method", "rank", "n_skills", "n_abstract_tasks",
                                                     "n_splits", "top_k", "expert_rank", "alpha", "adapter_args",
                                                     "target_modules", "budget_rank", "budget_vary", "budget_tolerance")
                   else "data and prompts" if f.name in ("data", "tasks", "task_seed", "split", "train_per_task", "eval_per_task",
                                                         "unseen_tasks", "unseen_per_task", "allow_fewer_train", "n_pos",
                                                         "max_source_len", "max_target_len", "max_new_tokens",
                                                         "chat_template")
                   else "optimisation" if f.name in ("batch_size", "length_window", "grad_accum", "lr", "router_lr", "weight_decay",
                                                     "warmup_ratio", "warmup_steps", "schedule", "epochs", "max_steps",
                                                     "max_grad_norm", "mixed_precision", "gradient_checkpointing", "seed")
                   else "run folder, checkpoints, evaluation")
        g = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        kind, help_text = f.metadata["kind"], f.metadata["help"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            g.add_argument(flag, *_ALIASES.get(f.name, []), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
        elif kind == "dict":
            g.add_argument("--adapter-arg", dest=f.name, action="append", type=_kv, metavar="KEY=VALUE",
                           default=argparse.SUPPRESS, help=help_text)
        else:
            extra = ""
            if kind == "method":
                extra = f"; one of {', '.join(sorted(METHODS))}"
            elif kind == "choice":
                extra = f"; one of {', '.join(f.metadata['choices'])}"
            metavar = {"int": "N", "opt_int": "N", "opt_int_all": "N", "float": "X", "opt_float": "X",
                       "method": "METHOD", "choice": "{" + ",".join(f.metadata.get("choices", ())) + "}",
                       "tasks": "TASKS", "unseen": "TASKS", "targets": "MODULES"}.get(kind, "VALUE")
            if f.name in ("model", "data", "out"):
                metavar = "PATH"
            g.add_argument(flag, *_ALIASES.get(f.name, []), dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{help_text}{extra} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchmoe", description="Multi-task PEFT with routed mixtures of LoRA experts "
                                "(OrchMoE, MoDE, MoLoRA, Poly, MHR, LoRA) on Super-NaturalInstructions.")
    p.add_argument("--version", action="version", version=f"orchmoe {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train an adapter (then evaluate it)",
                       description="Train a routed adapter on SuperNI tasks, save it, evaluate it. "
                                   "Re-running with the same --out resumes from the latest checkpoint.")
    _add_train_flags(t)

    e = sub.add_parser("eval", help="evaluate a run folder", description="Score a run's adapter on the held-out "
                       "instances of its seen tasks and on unseen test-split tasks.")
    e.add_argument("run", metavar="RUN", help="run folder written by `orchmoe train`")
    e.add_argument("--data", help="where the SuperNI files are now (default: as trained)")
    e.add_argument("--model", help="where the base model is now (default: as trained)")
    e.add_argument("--batch-size", type=int, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=int, help="generation length")
    e.add_argument("--unseen-tasks", help="unseen tasks to score: 'all', a number, 0, or names")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="compare runs in one Markdown table")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.json)")
    r.add_argument("--out", metavar="FILE", help="also write the report to this file")

    a = sub.add_parser("analyze", help="routing analysis of a run (task-skill allocations, clustering)")
    a.add_argument("run", metavar="RUN")
    a.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis)")
    return p


def train_config_from_args(args: argparse.Namespace):
    """Defaults < config file < command-line flags."""
    from .train import TrainConfig, config_from_mapping, load_config_file

    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "debug")}
    extra = dict(flags.pop("adapter_args", []) or [])
    flags = config_from_mapping(flags, origin="command line")
    if extra:
        flags["adapter_args"] = {**values.get("adapter_args", {}), **extra}
    return TrainConfig(**{**values, **flags})


class CLIError(Exception):
    """An error already phrased for the user."""


def _errors() -> tuple[type[BaseException], ...]:
    from .budget import BudgetError
    from .config import ConfigError
    from .data import DataError
    from .model import AdapterMismatchError
    from .routing import RoutingError
    from .train import TrainConfigError

    return (CLIError, TrainConfigError, ConfigError, DataError, BudgetError, RoutingError, AdapterMismatchError,
            FileNotFoundError, NotADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .train import train

            train(train_config_from_args(args))
        elif args.command == "eval":
            from .evaluate import evaluate_run

            evaluate_run(args.run, data=args.data, model=args.model, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, unseen_tasks=args.unseen_tasks, progress=not args.no_progress)
        elif args.command == "report":
            from .report import write_report

            write_report(args.runs, args.out)
        elif args.command == "analyze":
            import importlib

            try:
                analysis = importlib.import_module(".analysis", __package__)
            except ImportError as e:
                raise CLIError(f"routing analysis is not available: {e}") from e
            try:
                analysis.analyze_run(args.run, out_dir=args.out)
            except getattr(analysis, "AnalysisError", ()) as e:
                raise CLIError(str(e)) from e
    except _errors() as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"orchmoe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
