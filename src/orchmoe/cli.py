"""The `orchmoe` command: train, eval, report, analyze, serve, predict, export.

    orchmoe train                                     # the builtin suite with the defaults
    orchmoe train --method poly --data path/to/natural-instructions --tasks 100 --out runs/poly
    orchmoe train --config my.yaml --learning_rate 3e-4    # flags override the file; TrainingArguments spellings
    orchmoe train --rank 4 --n-skills 8 --report_to tensorboard wandb
    torchrun --nproc_per_node 2 --master_port 29500 -m orchmoe train ...   # several processes (DDP)
    orchmoe eval runs/orch                            # its own tasks again
    orchmoe eval runs/orch --data path/to/superni --tasks task1,task2     # other data, into runs/orch/eval-*/
    orchmoe report runs/orch runs/poly runs/lora --out report.md
    orchmoe analyze runs/orch
    orchmoe serve runs/orch                           # the OpenAI HTTP API (orchmoe.serving)
    orchmoe predict runs/orch --input rows.jsonl --output answers.jsonl
    orchmoe export runs/orch --bundle bundles/orch    # PEFT LoRAs for vLLM / SGLang (orchmoe.recipe.export_run)

``train`` parses its options with `transformers.HfArgumentParser` (`orchmoe.recipe.parse`). Any expected
failure is one line naming the problem and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence

from orchmoe.version import __version__

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


class _ExactParser(argparse.ArgumentParser):
    """Flags are exact: a prefix is not silently taken for the option it happens to begin."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def _eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a run folder (its own tasks, or other data)",
        description="Score a run's adapter: on the held-out instances of its seen tasks and its unseen tasks "
        "(rewrites metrics.json/.md), or with --data/--tasks on other data, into RUN/eval-<name>/.",
    )
    e.add_argument("run", metavar="RUN", help="run folder written by `orchmoe train`")
    e.add_argument("--data", help="other data to score (a SuperNI folder, 'builtin', instruction tables)")
    e.add_argument("--tasks", help="tasks of that data to score: names, a file, a split, a number or 'all'")
    e.add_argument("--unseen-tasks", help="without --data: the run's unseen tasks to score ('all', a number, 0, names)")
    e.add_argument("--unseen-per-task", type=_positive_int, help="instances per scored task (the first ones)")
    e.add_argument("--split", help="the split of --data whose tasks are drawn from")
    e.add_argument("--name", help="the eval-<name> folder for other data (default: from --data and --tasks)")
    e.add_argument("--model", help="where the base model is now (default: as trained)")
    e.add_argument("--batch-size", type=_positive_int, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=_positive_int, help="generation length")
    e.add_argument("--overwrite", action="store_true", help="replace an existing eval-<name> folder")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchmoe",
        description="Multi-task PEFT with routed mixtures of LoRA experts (OrchMoE, MoDE, MoLoRA, Poly, MHR, LoRA).",
    )
    p.add_argument("--version", action="version", version=f"orchmoe {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ExactParser)
    sub.required = True
    sub.add_parser(
        "train", help="train an adapter (then evaluate it); `orchmoe train --help` lists its options", add_help=False
    )
    _eval_parser(sub)
    r = sub.add_parser(
        "report",
        help="compare runs in one Markdown table",
        description="One Markdown table comparing evaluated runs, then ROUGE-L per task category.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.json)")
    r.add_argument("--out", metavar="FILE", help="also write the report to this file")
    a = sub.add_parser(
        "analyze",
        help="routing analysis of a run (task-skill allocations, clustering)",
        description="What the routers learned, written to RUN/analysis/ (analysis.md, .json, figures).",
    )
    a.add_argument("run", metavar="RUN")
    a.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis)")
    a.add_argument("--model", help="where the base model is now (default: as trained)")
    a.add_argument("--data", help="where the data are now (default: as trained)")
    from orchmoe.recipe.export_run import add_export_parser
    from orchmoe.serving.cli import add_predict_parser, add_serve_parser

    add_serve_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    return p


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    if args.command == "train":
        from orchmoe.recipe.parse import parse_train_args
        from orchmoe.recipe.train import train

        train(parse_train_args(rest))
    elif args.command == "eval":
        from orchmoe.recipe.evaluate import evaluate_run

        evaluate_run(
            args.run,
            data=args.data,
            tasks=args.tasks,
            unseen_tasks=args.unseen_tasks,
            unseen_per_task=args.unseen_per_task,
            split=args.split,
            name=args.name,
            model=args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    elif args.command in ("serve", "predict"):
        from orchmoe.serving import cli as serving_cli

        (serving_cli.run_serve if args.command == "serve" else serving_cli.run_predict)(args)
    elif args.command == "export":
        from orchmoe.recipe.export_run import run_export

        run_export(args)
    elif args.command == "report":
        from orchmoe.recipe.report import write_report

        write_report(args.runs, args.out)
    elif args.command == "analyze":
        _analyze(args)


def _analyze(args: argparse.Namespace) -> None:
    try:
        from orchmoe.recipe.analysis import analyze_run
    except ImportError as e:
        raise RuntimeError(f"routing analysis needs matplotlib and scipy (pip install 'orchmoe[analysis]'): {e}") from e
    result = analyze_run(args.run, out_dir=args.out, model=args.model, data=args.data)
    out = args.out or f"{args.run}/analysis"
    spread = result["allocation_spread"]
    print(
        f"analysis of {args.run} written to {out}/ (analysis.md, analysis.json, {len(result['files']) - 2} figures); "
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
    args, rest = parser.parse_known_args(argv)
    if args.command == "train" and "--debug" in rest:
        args.debug, rest = True, [a for a in rest if a != "--debug"]
    if rest and args.command != "train":
        _reject_unknown(parser, args, rest)
    try:
        try:
            _run(args, rest)
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
