"""Evaluation: batched greedy generation and the official SuperNI scores.

Prompts are built exactly as in training (same demonstrations, token budget, chat template),
left-padded and sorted by length so a batch wastes little compute; each prompt's routing is
computed once from the prompt by `RoutedModel.generate` and held for every decoding step.
Poly/MHR get the seen task's id and -1 (the mean allocation) for an unseen task; the other
methods route from the input alone. Scores come from `orchmoe.evaluation.metrics` (ROUGE-L, ROUGE-Lsum,
ROUGE-1, exact match; best over the references; x100).

Writes into the run folder: ``predictions.jsonl`` (one record per instance), ``metrics.json``
(overall / seen / unseen, per task, per category) and ``metrics.md`` (the same as tables).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from orchmoe.data import encode_prompt, pad_batch
from orchmoe.evaluation.metrics import aggregate, score_example
from orchmoe.loading.pretrained import is_encoder_decoder, load_model_and_tokenizer
from orchmoe.recipe.data import build_data, prompt_settings, quiet_length_warning
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.recipe.runtime import make_accelerator
from orchmoe.tuner.model import load_adapter
from orchmoe.utils.markdown import markdown_table

__all__ = ["generate_predictions", "evaluate_model", "evaluate_run", "format_metrics_markdown", "process_batches"]


def _gather(obj: list, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


def process_batches(batches: list[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This process's generation batches, as (example indices, keep): every W-th batch, then repeats of the last
    (shortest) batch with keep=False until every process has the same number of ``generate()`` calls.

    Equal counts matter under FSDP, where each decoding step all-gathers the sharded blocks on every process:
    a process that stopped early would leave the others waiting forever. The repeats' outputs are dropped.
    """
    if not batches:
        return []
    per_process = -(-len(batches) // world)  # ceil
    mine = [(b, True) for b in batches[rank::world]]
    return mine + [(batches[-1], False)] * (per_process - len(mine))


@torch.no_grad()
def generate_predictions(
    model,
    tokenizer,
    examples,
    task_defs,
    *,
    n_pos: int = 2,
    max_source_len: int = 512,
    max_new_tokens: int = 64,
    chat_template: bool = False,
    decoder_only: bool = True,
    batch_size: int = 16,
    accelerator=None,
    progress: bool = True,
) -> list[str]:
    """Greedy predictions for `examples` (in their order), decoded from the new tokens only and stripped.

    Batches are cut from the prompts sorted longest first; with several processes each takes
    every W-th batch (all processes making the same number of ``generate()`` calls, `process_batches`)
    and the predictions are gathered.
    """
    from tqdm.auto import tqdm

    if not examples:
        return []
    quiet_length_warning(tokenizer)
    routed = model
    needs_task_ids = routed.adapter_config.needs_task_ids
    prompts = [
        encode_prompt(
            tokenizer,
            task_defs[ex.task],
            ex.input,
            n_pos=n_pos,
            max_source_len=max_source_len,
            decoder_only=decoder_only,
            chat_template=chat_template,
        )
        for ex in examples
    ]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = process_batches(batches, rank, world)
    device = next(routed.parameters()).device
    gen_kwargs = _greedy(tokenizer, max_new_tokens)
    pad = gen_kwargs["pad_token_id"]
    was_training = routed.training
    routed.eval()
    results: list[tuple[int, str]] = []
    show = progress and (accelerator is None or accelerator.is_main_process)
    bar = tqdm(total=len(examples), desc="generate", unit="ex", dynamic_ncols=True, disable=not show)
    try:
        for idx, keep in mine:
            feats = [{"input_ids": prompts[i]} for i in idx]
            batch = pad_batch(feats, pad, "left", decoder_only=True)
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            kwargs = dict(gen_kwargs)
            if needs_task_ids:
                kwargs["task_ids"] = torch.tensor([examples[i].task_id for i in idx], device=device)  # -1: unseen
            seqs = routed.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if not keep:
                continue  # a repeat that keeps this process in step with the others
            new = seqs[:, input_ids.shape[1] :] if decoder_only else seqs
            start = None if decoder_only else routed.generation_config.decoder_start_token_id
            results += zip(idx, _decode(tokenizer, new, start))
            bar.update(len(idx) * world)
    finally:
        bar.close()
        routed.train(was_training)
    gathered = _gather(results, accelerator)
    preds: list[str | None] = [None] * len(examples)
    for i, p in gathered:
        preds[i] = p
    if any(p is None for p in preds):
        raise RuntimeError("a prediction went missing while gathering the processes' predictions")
    return preds  # type: ignore[return-value]


def _greedy(tokenizer, max_new_tokens: int) -> dict:
    """generate() settings of the evaluation: greedy, stop at eos, pad with the pad token (eos without one)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None)  # fmt: skip


def _decode(tokenizer, new_tokens: torch.Tensor, start: int | None) -> list[str]:
    """Each row's text up to its eos (an encoder-decoder's decoder start token dropped), stripped."""
    eos, out = tokenizer.eos_token_id, []
    for row in new_tokens.tolist():
        if start is not None and row and row[0] == start:
            row = row[1:]
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def _row(scores: dict) -> list:
    return [scores["n"], scores["rougeL"], scores.get("rougeLsum"), scores["rouge1"], scores["exact_match"]]


def format_metrics_markdown(metrics: dict, *, per_task: bool = True) -> str:
    """The summary (all / seen / unseen), per-category and per-task tables."""
    title = f"## {metrics.get('run', 'run')}: {metrics.get('method', '?')} on {metrics.get('base_model', '?')}"
    summary_rows = [["all", *_row(metrics["overall"])]]
    for part, label in (("seen", "seen tasks (held-out instances)"), ("unseen", "unseen tasks")):
        if part in metrics:
            summary_rows.append([label, *_row(metrics[part]["overall"])])
    parts = [title, "", markdown_table(["split", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], summary_rows)]
    cat_rows = []
    for part in ("seen", "unseen"):
        for cat, s in metrics.get(part, {}).get("per_category", {}).items():
            cat_rows.append([cat, part, *_row(s)])
    if cat_rows:
        parts += [
            "",
            "### Per category",
            "",
            markdown_table(["category", "tasks", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], cat_rows),
        ]
    if per_task:
        task_rows = []
        for part in ("seen", "unseen"):
            for task, s in metrics.get(part, {}).get("per_task", {}).items():
                task_rows.append([task, metrics.get("categories", {}).get(task, "?"), part, *_row(s)])
        if task_rows:
            parts += [
                "",
                "### Per task",
                "",
                markdown_table(["task", "category", "tasks", "n", "ROUGE-L", "ROUGE-Lsum", "ROUGE-1", "EM"], task_rows),
            ]
    return "\n".join(parts) + "\n"


def evaluate_model(
    model,
    tokenizer,
    data,
    cfg,
    out_dir: str | os.PathLike | None,
    *,
    accelerator=None,
    decoder_only: bool | None = None,
    print_table: bool = True,
) -> dict:
    """Generate for the held-out instances of the seen tasks and the unseen tasks, score, write, print.

    Args:
        model: the `RoutedModel` (unwrapped).
        data: the run's `MultiTaskData`; cfg: its `TrainConfig` (prompts, generation length, batch size).
        out_dir: the run folder to write predictions.jsonl, metrics.json and metrics.md into (None: no files).
        accelerator: the run's `Accelerator` (several processes share the generation; the main one scores).
    Returns:
        The metrics dict (empty on the processes other than the main one).
    """
    if decoder_only is None:
        decoder_only = not is_encoder_decoder(model)
    examples = list(data.eval) + list(data.unseen)
    if not examples:
        raise ValueError("nothing to evaluate: eval_per_task is 0 and there are no unseen tasks")
    t0 = time.perf_counter()
    with accelerator.autocast() if accelerator is not None else nullcontext():  # the training precision
        preds = generate_predictions(
            model,
            tokenizer,
            examples,
            data.task_defs,
            **prompt_settings(cfg),
            max_new_tokens=cfg.generation_tokens,
            decoder_only=decoder_only,
            batch_size=cfg.eval_batch_size,
            accelerator=accelerator,
            progress=cfg.progress,
        )
    gen_seconds = time.perf_counter() - t0
    if accelerator is not None and not accelerator.is_main_process:  # scoring and writing are the main process's
        return {}
    scores = [score_example(p, list(ex.references)) for ex, p in zip(examples, preds)]  # each scored once
    records = [
        {"task": ex.task, "category": ex.category, "seen": ex.seen, "pred": p, "refs": list(ex.references), "scores": s}
        for ex, p, s in zip(examples, preds, scores)
    ]
    out = Path(out_dir) if out_dir is not None else None
    metrics = _metrics(model, data, cfg, out, aggregate(records), len(examples), gen_seconds)
    if out is not None:
        predictions = [
            {"task": ex.task, "category": ex.category, "seen": ex.seen, "id": ex.id, "input": ex.input,
             "prediction": p, "references": list(ex.references), "scores": s}
            for ex, p, s in zip(examples, preds, scores)
        ]  # fmt: skip
        RunFolder(out).write_results(metrics, format_metrics_markdown(metrics), predictions)
    if print_table:
        print(format_metrics_markdown(metrics, per_task=len(metrics["per_task"]) <= 40))
        if out is not None:
            print(
                f"predictions: {out / RunFolder.PREDICTIONS}; metrics: {out / RunFolder.METRICS}, "
                f"{out / RunFolder.METRICS_MD} ({len(examples)} examples in {gen_seconds:.0f} s)"
            )
    return metrics


def _metrics(model, data, cfg, out: Path | None, agg: dict, n_examples: int, gen_seconds: float) -> dict:
    """metrics.json: the scores with what produced them (method, parameters, training, generation settings)."""
    train_summary = RunFolder(out).read_summary() if out is not None else {}
    return {
        "run": out.name if out is not None else None,
        "method": model.adapter_config.method,
        "base_model": model.base_model_name,
        "trainable_parameters": model.num_parameters_split()[0],
        "train_seconds": train_summary.get("train_seconds"),
        "train_steps": train_summary.get("steps"),
        "n_seen_tasks": len(data.seen_tasks),
        "n_unseen_tasks": len(data.unseen_tasks),
        "n_examples": n_examples,
        "eval_seconds": round(gen_seconds, 3),
        "generation": {
            "max_new_tokens": cfg.generation_tokens,
            "batch_size": cfg.eval_batch_size,
            "n_pos": cfg.n_pos,
            "max_source_len": cfg.max_source_len,
            "chat_template": cfg.chat_template,
            "greedy": True,
        },
        "categories": data.categories(),
        **agg,
    }


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    unseen_tasks: Any = None,
    progress: bool = True,
    print_table: bool = True,
) -> dict:
    """Load base model + adapter from a run folder, rebuild its (seeded) evaluation sets, score them.

    `data` / `model` override where the SuperNI files / the base model are found (e.g. a run
    trained on another machine); the tasks and instances are the ones the run was trained with.
    """
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"run folder {str(run.path)!r} does not exist")
    if not run.adapter_dir.is_dir():
        raise FileNotFoundError(
            f"{run.path} has no adapter/ folder: train it first (or it is not an orchmoe run folder)"
        )
    cfg, _ = run.read_config()
    if data is not None:
        cfg.data = data
    if model is not None:
        cfg.model = model
    if batch_size is not None:
        cfg.eval_batch_size = batch_size
    if max_new_tokens is not None:
        cfg.max_new_tokens = max_new_tokens
    if unseen_tasks is not None:
        cfg.unseen_tasks = unseen_tasks
    cfg.progress, cfg.report_to = progress, "none"
    cfg.validate()
    ds = build_data(cfg)
    if not ds.eval and not ds.unseen:
        raise ValueError("nothing to evaluate: eval_per_task is 0 and there are no unseen tasks")
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        run.claim()  # a training into the same folder, or another eval of it, would race for its results files
    try:
        base, tokenizer, info = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=accelerator.device)
        routed = load_adapter(base, run.adapter_dir, base_model_name=info["name"]).to(accelerator.device)
        saved_ids = getattr(routed, "adapter_metadata", {}).get("task_to_id")
        if saved_ids is not None and saved_ids != ds.task_to_id:
            raise ValueError(
                f"the tasks rebuilt from {run / RunFolder.CONFIG} ({sorted(ds.task_to_id)[:5]}...) are not the "
                f"ones the adapter was trained on ({sorted(saved_ids)[:5]}...); check --data"
            )
        return evaluate_model(
            routed,
            tokenizer,
            ds,
            cfg,
            run.path,
            accelerator=accelerator,
            decoder_only=not is_encoder_decoder(base),
            print_table=print_table,
        )
    finally:
        run.release()
