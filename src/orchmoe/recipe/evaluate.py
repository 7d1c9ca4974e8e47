"""Evaluating a run: its adapter's greedy predictions, scored with the official SuperNI metrics, written to the
run folder (`orchmoe.evaluation` generates and scores; this module decides what to evaluate and where to write).

After training, the run's own held-out instances of its seen tasks and its unseen tasks (``predictions.jsonl``,
``metrics.json``, ``metrics.md`` in the run folder; the final scores also to the trackers, ``eval/...``).
``orchmoe eval RUN`` scores them again; ``orchmoe eval RUN --data D --tasks ...`` scores the adapter on any other
data (new unseen tasks, other instance counts, other splits) into ``RUN/eval-<name>/``, beside the run's own
metrics, never over them (``--overwrite`` replaces an earlier ``eval-<name>``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from orchmoe.data import PromptFormat
from orchmoe.evaluation.evaluate import format_metrics_markdown, score_predictions
from orchmoe.evaluation.generate import generate_predictions
from orchmoe.recipe.args import ArgumentsError, DataArguments
from orchmoe.recipe.parse import RunOptions
from orchmoe.recipe.run_data import build_data, data_arguments
from orchmoe.recipe.run_folder import RunFolder

__all__ = ["evaluate_model", "evaluate_run", "evaluate_trained", "write_trained"]


def evaluate_model(
    model,
    tokenizer,
    data,
    prompt: PromptFormat,
    *,
    max_new_tokens: int,
    batch_size: int,
    accelerator=None,
    progress: bool = True,
) -> tuple[list[dict], dict, float]:
    """Generate for the held-out instances of the seen tasks and the unseen tasks, and score them.

    Args:
        model: the PeftModel; data: a `MultiTaskData`; prompt: how the prompts are built (the adapter's format).
        accelerator: several processes share the generation (each gets the predictions of all).
    Returns:
        (one record per example, the aggregated scores, generation seconds).
    """
    from orchmoe.loading import is_encoder_decoder

    examples = list(data.eval) + list(data.unseen)
    if not examples:
        raise ArgumentsError("nothing to evaluate: eval_per_task is 0 and there are no unseen tasks")
    t0 = time.perf_counter()
    preds = generate_predictions(
        model,
        tokenizer,
        examples,
        data.task_defs,
        n_pos=prompt.n_pos,
        max_source_len=prompt.max_source_len,
        chat_template=prompt.chat_template,
        max_new_tokens=max_new_tokens,
        decoder_only=not is_encoder_decoder(model.get_base_model()),
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
    )
    records, agg = score_predictions(examples, preds)
    return records, agg, time.perf_counter() - t0


def _metrics(model, data, run: RunFolder, agg: dict, n: int, seconds: float, generation: dict) -> dict[str, Any]:
    """metrics.json: the scores with what produced them (method, parameters, training, generation settings)."""
    summary = run.read_summary()
    return {
        "run": run.path.name,
        "method": model.peft_config["default"].method,
        "base_model": model.base_model_name,
        "trainable_parameters": model.num_parameters_split()[0],
        "train_seconds": summary.get("train_seconds"),
        "train_steps": summary.get("steps"),
        "n_seen_tasks": len(data.seen_tasks),
        "n_unseen_tasks": len(data.unseen_tasks),
        "n_examples": n,
        "eval_seconds": round(seconds, 3),
        "generation": {**generation, "greedy": True},
        "categories": data.categories(),
        **agg,
    }


def _write(run: RunFolder, metrics: dict, records: list[dict], folder: Path | None, quiet: bool = False) -> None:
    out = run.write_results(metrics, format_metrics_markdown(metrics), records, folder)
    if not quiet:
        print(format_metrics_markdown(metrics, per_task=len(metrics["per_task"]) <= 40))
        print(
            f"predictions: {out / RunFolder.PREDICTIONS}; metrics: {out / RunFolder.METRICS}, "
            f"{out / RunFolder.METRICS_MD} "
            f"({metrics['n_examples']} examples in {metrics['eval_seconds']:.0f} s)"
        )


def evaluate_trained(model, tokenizer, data, options: RunOptions, run: RunFolder, trainer) -> tuple[dict, list]:
    """The evaluation at the end of ``orchmoe train``: every process generates, the main one scores and logs the
    scores to the trackers (still open: it runs as the training ends). Returns (metrics, records) on the main
    process ({} and [] elsewhere); `write_trained` writes them once the run's summary exists."""
    prompt = PromptFormat.from_adapter_metadata(model.adapter_metadata)  # what the recipe saved with the adapter
    generation = {
        "max_new_tokens": options.generation_tokens,
        "batch_size": options.training.per_device_eval_batch_size,
        "n_pos": prompt.n_pos,
        "max_source_len": prompt.max_source_len,
        "chat_template": prompt.chat_template,
    }
    accelerator = trainer.accelerator
    records, agg, seconds = evaluate_model(
        model,
        tokenizer,
        data,
        prompt,
        max_new_tokens=options.generation_tokens,
        batch_size=options.training.per_device_eval_batch_size,
        accelerator=accelerator,
        progress=not options.training.disable_tqdm,
    )
    if not accelerator.is_main_process:
        return {}, []
    metrics = _metrics(model, data, run, agg, len(records), seconds, generation)
    trainer.log(_tracker_scores(metrics))
    return metrics, records


def write_trained(run: RunFolder, metrics: dict, records: list) -> dict:
    """metrics.json / .md and predictions.jsonl of the end-of-training evaluation, with the run's summary in it."""
    summary = run.read_summary()
    metrics = {**metrics, "train_seconds": summary.get("train_seconds"), "train_steps": summary.get("steps")}
    _write(run, metrics, records, None)
    return metrics


def _tracker_scores(metrics: dict) -> dict[str, float]:
    """The final scores as the Trainer logs evaluations (``eval_...`` keys, ``eval/...`` in trackers): per split and
    per task, counts left out."""
    out: dict[str, float] = {}
    for part in ("seen", "unseen"):
        for key, value in metrics.get(part, {}).get("overall", {}).items():
            if key != "n":
                out[f"eval_{part}_{key}"] = value
        for task, scores in metrics.get(part, {}).get("per_task", {}).items():
            out[f"eval_{part}_task/{task}_rougeL"] = scores["rougeL"]
    return out


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    tasks: str | None = None,
    eval_per_task: int | None = None,
    unseen_tasks: str | None = None,
    unseen_per_task: int | None = None,
    split: str | None = None,
    name: str | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    print_table: bool = True,
) -> dict:
    """Score a run's adapter: on its own tasks (rebuilt from its config.yaml; into the run folder), or, given
    ``data`` or ``tasks``, on that data (every listed task scored as unseen by a task-routed method unless it is one
    the adapter was trained on; into ``RUN/eval-<name>``).

    Raises:
        FileNotFoundError: no run folder or adapter; ArgumentsError: nothing to evaluate, an existing eval folder.
    """
    from orchmoe.adapters.folder import load_adapter
    from orchmoe.loading import load_model_and_tokenizer

    run = RunFolder(run_dir).require_existing()
    if not run.adapter_dir.is_dir():
        raise FileNotFoundError(
            f"{run.path} has no adapter/ folder: train it first (or it is not an orchmoe run folder)"
        )
    saved, _ = run.read_config()
    data_args = _data_arguments(saved, data, split, unseen_per_task, eval_per_task)
    new_data = data is not None or tasks is not None
    folder = run.path / f"eval-{_slug(name or _default_name(data_args, tasks))}" if new_data else None
    if folder is not None and folder.exists() and not overwrite:
        raise ArgumentsError(f"{folder} exists: pass --overwrite to replace it, or --name for another folder")
    if new_data:
        ds = _other_data(data_args, tasks or unseen_tasks or "all", int(saved.get("seed", 0)))
    else:
        if unseen_tasks is not None:
            data_args.unseen_tasks = unseen_tasks
        ds = build_data(data_args, int(saved.get("seed", 0)))
    run.claim("run folder")  # a training into the same folder, or another eval of it, would race for its files
    try:
        base, tokenizer, info = load_model_and_tokenizer(model or saved.get("model"), dtype=saved.get("dtype", "auto"))
        routed = load_adapter(base, run.adapter_dir, base_model_name=info["name"])
        if not new_data:
            _check_same_tasks(routed, ds, run)
        else:
            _relabel(routed, ds)
        prompt = PromptFormat.from_adapter_metadata(routed.adapter_metadata, where=str(run.adapter_dir))
        tokens = max_new_tokens or saved.get("max_new_tokens") or data_args.max_target_len
        size = batch_size or int(saved.get("per_device_eval_batch_size", 16))
        records, agg, seconds = evaluate_model(
            routed, tokenizer, ds, prompt, max_new_tokens=tokens, batch_size=size, progress=progress
        )
        metrics = _metrics(
            routed,
            ds,
            run,
            agg,
            len(records),
            seconds,
            {
                "max_new_tokens": tokens,
                "batch_size": size,
                "n_pos": prompt.n_pos,
                "max_source_len": prompt.max_source_len,
                "chat_template": prompt.chat_template,
            },
        )
        if folder is not None:
            metrics["data"] = {"data": data_args.data, "tasks": tasks or unseen_tasks or "all"}
        _write(run, metrics, records, folder, quiet=not print_table)
        return metrics
    finally:
        run.release()


def _data_arguments(saved: dict, data, split, unseen_per_task, eval_per_task) -> DataArguments:
    """The run's data options (from its config.yaml), with the ones given to ``orchmoe eval``."""
    return data_arguments(saved, data=data, split=split, unseen_per_task=unseen_per_task, eval_per_task=eval_per_task)


def _other_data(data_args: DataArguments, tasks: str, seed: int):
    """Other data than the run's: every task named scored on its first ``unseen_per_task`` instances (none trained)."""
    from orchmoe.data import load_multitask
    from orchmoe.recipe.run_data import parse_unseen

    return load_multitask(
        data_args.data,
        [],
        split=data_args.split,
        n_train=0,
        n_eval=0,
        n_unseen_tasks=parse_unseen(tasks),
        seed=seed,
        n_unseen_eval=data_args.unseen_per_task,
        allow_fewer_train=True,
        task_column=data_args.task_column,
    )


def _default_name(data_args: DataArguments, tasks: str | None) -> str:
    return f"{Path(str(data_args.data)).name or 'data'}-{tasks or 'all'}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")[:80]
    if not slug:
        raise ArgumentsError(f"--name {text!r} has no usable characters for a folder name")
    return slug


def _check_same_tasks(routed, ds, run: RunFolder) -> None:
    saved_ids = routed.adapter_metadata.get("task_to_id")
    if saved_ids is not None and saved_ids != ds.task_to_id:
        raise ArgumentsError(
            f"the tasks rebuilt from {run / RunFolder.CONFIG} ({sorted(ds.task_to_id)[:5]}...) are not the ones the "
            f"adapter was trained on ({sorted(saved_ids)[:5]}...); check --data, or score other data with --tasks"
        )


def _relabel(routed, ds) -> None:
    """Other data: an example of a task the adapter was trained on gets that task's id back (Poly/MHR route by it;
    it counts as seen), any other task is unseen (-1: the mean allocation)."""
    import dataclasses

    known = routed.adapter_metadata.get("task_to_id") or {}
    ds.unseen = [dataclasses.replace(ex, task_id=int(known.get(ex.task, -1))) for ex in ds.unseen]
