"""The `orchmoe` command: train, eval, report, analyze, export.

    orchmoe train                                     # the builtin suite with the defaults
    orchmoe train --method poly --data path/to/natural-instructions --tasks 100 --out runs/poly
    orchmoe train --config my.yaml --lr 3e-4          # flags override the file
    orchmoe train --adapter.rank 4 --adapter.n-skills 8
    torchrun --nproc_per_node 2 --master_port 29500 -m orchmoe train ...   # several processes (DDP; --fsdp shards)
    orchmoe eval runs/orch
    orchmoe report runs/orch runs/poly runs/lora --out report.md
    orchmoe analyze runs/orch
    orchmoe export runs/orch --bundle bundles/orch   # PEFT LoRAs for vLLM / SGLang (see orchmoe.recipe.export_cmd)

Every `train` flag is generated from a field of `orchmoe.recipe.TrainConfig` (its help, group and aliases);
the adapter's flags from the registered methods' config dataclasses. Any expected failure is one line
naming the problem and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from .options import GROUPS, TrainConfig, adapter_fields, config_from_mapping, load_config_file, option_names

__all__ = ["main", "build_parser", "train_config_from_args"]

_ADAPTER_DEST = "adapter."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (names as below); flags override it")
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adapter":
            continue
        meta, g = f.metadata, groups[f.metadata["group"]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = [_flag(f.name)] + [_flag(a) for a in meta["aliases"]]
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        extra = f"; one of {', '.join(choices)}" if choices else ""
        if f.type == "bool":
            g.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{meta['help']} (default: {default})",
            )
        else:
            metavar = (
                "PATH" if f.name in ("model", "data", "out") else "{" + ",".join(choices) + "}" if choices else "VALUE"
            )
            g.add_argument(
                *names,
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=f"{meta['help']}{extra} (default: {default})",
            )
    _add_adapter_flags(p)


def _add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """``--adapter.NAME`` for every option of every registered method; also ``--NAME`` unless a train option has it."""
    g = p.add_argument_group("adapter (the method's own options; see also --adapter.NAME)")
    taken = set(option_names())
    for name, f in sorted(adapter_fields().items()):
        names = [f"--adapter.{name}", f"--adapter.{name.replace('_', '-')}"]
        if name not in taken:
            names.append(_flag(name))
        g.add_argument(
            *dict.fromkeys(names),
            dest=_ADAPTER_DEST + name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f.metadata.get("help", ""),
        )
    g.add_argument(
        "--adapter-arg",
        dest="adapter_args",
        action="append",
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help="any adapter option as KEY=VALUE (the 0.1 spelling of --adapter.KEY VALUE)",
    )


class _ExactParser(argparse.ArgumentParser):
    """Flags are exact: a prefix is not silently taken for the option it happens to begin."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchmoe",
        description="Multi-task PEFT with routed mixtures of LoRA experts "
        "(OrchMoE, MoDE, MoLoRA, Poly, MHR, LoRA) on Super-NaturalInstructions.",
    )
    p.add_argument("--version", action="version", version=f"orchmoe {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ExactParser)
    sub.required = True
    t = sub.add_parser(
        "train",
        help="train an adapter (then evaluate it)",
        description="Train a routed adapter on SuperNI-format tasks, save it, evaluate it. "
        "Re-running with the same --out resumes from the latest checkpoint.",
    )
    _add_train_flags(t)
    e = sub.add_parser(
        "eval",
        help="evaluate a run folder",
        description="Score a run's adapter on the held-out "
        "instances of its seen tasks and on unseen test-split tasks; rewrites metrics.json/.md.",
    )
    e.add_argument("run", metavar="RUN", help="run folder written by `orchmoe train`")
    e.add_argument("--data", help="where the data are now (default: as trained)")
    e.add_argument("--model", help="where the base model is now (default: as trained)")
    e.add_argument("--batch-size", type=_positive_int, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=_positive_int, help="generation length")
    e.add_argument("--unseen-tasks", help="unseen tasks to score: 'all', a number, 0, or names")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = sub.add_parser(
        "report",
        help="compare runs in one Markdown table",
        description="One Markdown table comparing evaluated runs (scores, parameters, train time), "
        "then ROUGE-L per task category; warns when the runs were scored on different tasks.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.json)")
    r.add_argument("--out", metavar="FILE", help="also write the report to this file")
    a = sub.add_parser(
        "analyze",
        help="routing analysis of a run (task-skill allocations, clustering)",
        description="What the routers learned: per-layer allocation heatmaps, the Task Router's "
        "abstract tasks against the task categories (NMI), the task dendrogram; written "
        "to RUN/analysis/ (analysis.md, analysis.json, figures).",
    )
    a.add_argument("run", metavar="RUN")
    a.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis)")
    a.add_argument("--model", help="where the base model is now (default: as trained)")
    a.add_argument("--data", help="where the data are now (default: as trained)")
    from .export_cmd import add_export_parser

    add_export_parser(sub)
    return p


def _key_values(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for text in items:
        if "=" not in text:
            raise ValueError(f"--adapter-arg expects KEY=VALUE, got {text!r}")
        key, value = text.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < config file < command-line flags (the adapter section merged key by key)."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "debug")}
    adapter = {k[len(_ADAPTER_DEST) :]: flags.pop(k) for k in list(flags) if k.startswith(_ADAPTER_DEST)}
    adapter = {**_key_values(flags.pop("adapter_args", [])), **adapter}
    flags = config_from_mapping({**flags, **({"adapter": adapter} if adapter else {})}, origin="command line")
    if "adapter" in flags:
        flags["adapter"] = {**values.get("adapter", {}), **flags["adapter"]}
    return TrainConfig(**{**values, **flags})


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from .trainer import train

        train(train_config_from_args(args))
    elif args.command == "eval":
        from .evaluate import evaluate_run

        evaluate_run(
            args.run,
            data=args.data,
            model=args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            unseen_tasks=args.unseen_tasks,
            progress=not args.no_progress,
        )
    elif args.command == "report":
        from .report import write_report

        write_report(args.runs, args.out)
    elif args.command == "export":
        from .export_cmd import run_export

        run_export(args)
    elif args.command == "analyze":
        try:
            from .analysis import analyze_run
        except ImportError as e:
            raise RuntimeError(
                f"routing analysis needs matplotlib and scipy (pip install 'orchmoe[analysis]'): {e}"
            ) from e
        result = analyze_run(args.run, out_dir=args.out, model=args.model, data=args.data)
        out = args.out or f"{args.run}/analysis"
        spread = result["allocation_spread"]
        print(
            f"analysis of {args.run} written to {out}/ "
            f"(analysis.md, analysis.json, {len(result['files']) - 2} figures); "
            f"allocation spread {spread:.4f}"
            + (" (indistinguishable from uniform)" if result["allocations_uniform"] else "")
            + (
                f"; NMI abstract task vs category {result['category_agreement']['nmi']:.3f}"
                if "category_agreement" in result
                else ""
            )
        )


def _reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """An unknown flag is one error line with the closest known flags (argparse alone gives no hint)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    known = [o for a in sub._actions for o in a.option_strings]
    flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
    close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    sub.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _close_process_group() -> None:
    """A command launched on several processes ends its process group before the interpreter exits: a gloo
    group still open at exit can abort a process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 for any failure (one line naming it), 130 when interrupted."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, args, unknown)
    try:
        try:
            _run(args)
        finally:
            _close_process_group()
    except KeyboardInterrupt:
        print(f"orchmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one error path: a line, not a traceback
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        known = isinstance(e, (ValueError, OSError, RuntimeError)) and type(e).__module__.startswith(
            ("orchmoe", "builtins")
        )
        what = "" if known else f"{type(e).__name__}: "
        print(f"orchmoe {args.command}: error: {what}{msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
