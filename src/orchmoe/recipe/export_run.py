"""``orchmoe export PATH``: a trained adapter as standard PEFT LoRAs (one routing, or a multi-LoRA bundle).

    orchmoe export RUN --out DIR --task-id 3            # Poly/MHR: one task's routing (-1: unseen tasks)
    orchmoe export RUN --out DIR --abstract-task 2      # OrchMoE: one abstract task
    orchmoe export RUN --out DIR --prompt "Definition: ..."   # OrchMoE: the routing of one prompt
    orchmoe export RUN --bundle OUT                     # every routing + router + manifest + README (vllm/SGLang)
    orchmoe export RUN/adapter --bundle OUT --prompts prompts.jsonl

PATH is a run folder (``orchmoe train --out``) or an adapter folder. OrchMoE's bundle holds the abstract
tasks that are the argmax of pi over the run's training, evaluation and unseen-task prompts (rebuilt from
its config.yaml), over ``--prompts FILE`` instead, or all of them (``--all-abstract-tasks``). The bundle is
checked against the routed adapter on up to ``--check`` prompts (greedy answers compared).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orchmoe.data import PromptFormat
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.recipe.trained import locate_adapter
from orchmoe.utils.fileio import read_json_lines

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(sub) -> None:
    """The ``export`` subcommand's flags."""
    x = sub.add_parser(
        "export",
        help="export an adapter as PEFT LoRAs (one routing, or a multi-LoRA bundle for vLLM / SGLang)",
        description="Export a trained adapter as standard PEFT LoRAs: one routing (--out), or a multi-LoRA bundle "
        "(--bundle: one LoRA per routing a request can take, the router, a manifest, and a README with the vllm / "
        "SGLang commands). MoLoRA and MoDE route every token and cannot be exported.",
    )
    x.add_argument("path", metavar="PATH", help="run folder (orchmoe train --out) or adapter folder")
    where = x.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="write one routing as a PEFT LoRA folder")
    where.add_argument("--bundle", metavar="DIR", help="write the multi-LoRA bundle")
    one = x.add_mutually_exclusive_group()
    one.add_argument("--task-id", type=int, help="Poly/MHR: the task id (-1: unseen tasks)")
    one.add_argument("--task", metavar="NAME", help="Poly/MHR: a training task's name")
    one.add_argument("--abstract-task", type=int, metavar="K", help="OrchMoE: the abstract task")
    one.add_argument("--prompt", metavar="TEXT", help="OrchMoE: the routing of this prompt (as sent to a model)")
    x.add_argument("--prompts", metavar="FILE", help="bundle: jsonl of prompts to route (prompt, or definition+input)")
    x.add_argument("--all-abstract-tasks", action="store_true", help="bundle (OrchMoE): every abstract task")
    x.add_argument("--check", type=int, default=32, metavar="N", help="bundle: prompts checked (0: none; default 32)")
    x.add_argument("--max-new-tokens", type=int, default=32, help="bundle: answer length of the check (default 32)")
    x.add_argument("--batch-size", type=int, default=16, help="bundle: prompts per generate call of the check")
    x.add_argument("--model", help="where the base model is now (default: as trained)")
    x.add_argument("--data", help="where the run's data are now (default: as trained)")
    x.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in the output folder")


def run_prompts(run: RunFolder, data: str | None, tokenizer, fmt: PromptFormat, task_to_id: dict | None) -> list:
    """The run's training, evaluation and unseen-task prompts, rebuilt from its config.yaml as it trained on them."""
    from orchmoe.adapters.bundle import RoutedPrompt
    from orchmoe.data import quiet_length_warning
    from orchmoe.recipe.run_data import build_data, data_arguments

    cfg, _ = run.read_config()
    try:
        ds = build_data(data_arguments(cfg, data=data), int(cfg.get("seed", 0)))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot rebuild the prompts of the run {run.path} ({e}); pass --data (where its data are now), or "
            "--prompts FILE, or skip them: --check 0 (and --all-abstract-tasks for OrchMoE)"
        ) from None
    if task_to_id is not None and task_to_id != ds.task_to_id:
        raise ValueError(f"the tasks rebuilt from {run.path}/config.yaml are not the adapter's: check --data")
    quiet_length_warning(tokenizer)
    out = []
    for split, examples in (("train", ds.train), ("eval", ds.eval), ("unseen", ds.unseen)):
        for ex in examples:
            task = ds.task_defs[ex.task]
            ids = fmt.encode(tokenizer, task.definition, ex.input, task.positive_examples)
            out.append(RoutedPrompt(tuple(ids), task=ex.task, task_id=ex.task_id, split=split))
    return out


def _file_prompt(row: Any, where: str, tokenizer, fmt: PromptFormat, task_to_id: dict):
    from orchmoe.adapters.bundle import RoutedPrompt

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', or 'definition' and 'input'")
    task = row.get("task")
    if task is not None and not isinstance(task, str):
        raise ValueError(f"{where}: 'task' must be a string")
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        ids = fmt.encode_text(tokenizer, row["prompt"])
    elif isinstance(row.get("definition"), str) and isinstance(row.get("input"), str):
        examples = row.get("examples") or []
        if not isinstance(examples, list) or not all(
            isinstance(e, dict) and {"input", "output"} <= set(e) for e in examples
        ):
            raise ValueError(f"{where}: 'examples' must be a list of objects with 'input' and 'output'")
        ids = fmt.encode(tokenizer, row["definition"], row["input"], examples)
    else:
        raise ValueError(f"{where}: needs a non-empty 'prompt', or 'definition' and 'input' (strings)")
    return RoutedPrompt(tuple(ids), task=task, task_id=task_to_id.get(task, -1), split="file")


def file_prompts(path: str, tokenizer, fmt: PromptFormat, task_to_id: dict) -> list:
    """Prompts of a jsonl file: each line ``{"prompt": ...}`` (sent as it is) or ``{"definition", "input",
    "examples"?}`` (built as the training prompt); an optional ``task`` names its task (Poly/MHR route by it)."""
    rows = read_json_lines(path, "prompts file (JSON lines)")
    out = [_file_prompt(row, f"{path}:{n}", tokenizer, fmt, task_to_id) for n, row in rows]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def _routing(args, routed, tokenizer, task_to_id: dict) -> dict[str, Any]:
    """The one routing ``--out`` exports, from the flags."""
    if args.task is not None:
        if args.task not in task_to_id:
            known = ", ".join(sorted(task_to_id)[:8]) or "none recorded"
            raise ValueError(f"--task {args.task!r} is not a training task of this adapter (tasks: {known})")
        return {"task_id": task_to_id[args.task]}
    if args.task_id is not None:
        return {"task_id": args.task_id}
    if args.abstract_task is not None:
        return {"abstract_task": args.abstract_task}
    if args.prompt is not None:
        import torch

        return {"input_ids": torch.tensor([tokenizer(args.prompt)["input_ids"]])}
    return {}


def _check_flags(args) -> None:
    if args.bundle is not None and any(
        v is not None for v in (args.task_id, args.task, args.abstract_task, args.prompt)
    ):
        raise ValueError("--task-id, --task, --abstract-task and --prompt pick one routing: use them with --out")
    if args.out is not None and (args.prompts or args.all_abstract_tasks):
        raise ValueError("--prompts and --all-abstract-tasks shape a bundle: use them with --bundle")
    if args.check < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--check must be >= 0, --max-new-tokens and --batch-size >= 1")


def _print_bundle(manifest: dict, dest: Path) -> None:
    names = list(manifest["loras"])
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    print(f"wrote the {manifest['method']} bundle of {len(names)} LoRAs to {dest}: {shown}")
    print(("exact: " if manifest["exact"] else "not exact: ") + manifest["exactness"])
    a = manifest["agreement"]
    if a:
        print(
            f"check: greedy answers equal on {a['answers_equal']}/{a['prompts']} prompts ({100 * a['rate']:.1f} %, "
            f"first token {100 * a['first_token_equal']:.1f} %, {a['max_new_tokens']} new tokens); the adapter "
            f"changes the base model's answer on {a['adapter_changes_answer']} of them"
        )
    print(f"serve with vLLM (see {dest / 'README.md'}):\n  {manifest['serve']['vllm']}")


def run_export(args: argparse.Namespace) -> None:
    """Run ``orchmoe export`` (flags of `add_export_parser`)."""
    import dataclasses

    import torch

    from orchmoe.adapters.bundle import write_bundle
    from orchmoe.adapters.export import check_destination, export_peft_lora, refuse_token_routing
    from orchmoe.adapters.folder import adapter_config_from_meta, load_adapter
    from orchmoe.loading import is_encoder_decoder, load_model_and_tokenizer

    _check_flags(args)
    src = locate_adapter(args.path)
    cfg = adapter_config_from_meta(src.meta, src.adapter_dir)
    refuse_token_routing(cfg.method, cfg.routing)
    if args.bundle and cfg.routing == "prompt" and not (args.prompts or args.all_abstract_tasks or src.run):
        raise ValueError(
            f"an OrchMoE bundle holds the abstract tasks its prompts use, and {src.adapter_dir} is not inside a run "
            "folder whose prompts could be rebuilt: pass --prompts FILE (jsonl) or --all-abstract-tasks"
        )
    check_destination(args.out or args.bundle, overwrite=args.overwrite, protect=[src.adapter_dir])
    spec = src.base_model(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tok, info = load_model_and_tokenizer(spec, device=device)
    routed = load_adapter(base, src.adapter_dir, base_model_name=info["name"]).to(device).eval()
    metadata = routed.adapter_metadata
    task_to_id = dict(metadata.get("task_to_id") or {})
    if args.out is not None:
        dest = export_peft_lora(routed, args.out, overwrite=args.overwrite, protect=[src.adapter_dir],
                           **_routing(args, routed, tok, task_to_id))  # fmt: skip
        print(f"wrote a PEFT LoRA of one {cfg.method} routing to {dest}")
        return
    fmt = PromptFormat.from_adapter_metadata(metadata, where=str(src.adapter_dir))
    fmt = dataclasses.replace(fmt, decoder_only=not is_encoder_decoder(base))
    prompts, source = [], None
    needs_prompts = args.check > 0 or (cfg.routing == "prompt" and not args.all_abstract_tasks)
    if args.prompts:
        prompts = file_prompts(args.prompts, tok, fmt, task_to_id)
        source = f"the prompts file {args.prompts}"
    elif src.run is not None and needs_prompts:
        prompts = run_prompts(src.run, args.data, tok, fmt, task_to_id or None)
        source = f"the training, evaluation and unseen-task prompts of the run {src.run.path}"
    manifest = write_bundle(
        routed, args.bundle, tokenizer=tok, prompts=prompts, prompt_source=source,
        all_abstract_tasks=args.all_abstract_tasks, check=args.check, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, overwrite=args.overwrite, protect=[src.adapter_dir],
        fresh_base=lambda: load_model_and_tokenizer(spec, device=device)[0],
    )  # fmt: skip
    _print_bundle(manifest, Path(args.bundle).resolve())
