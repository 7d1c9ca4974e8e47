"""A run's data: the seeded multi-task split, its training features, and the record saved with the adapter
(so evaluation, analysis and serving rebuild exactly the same tasks and prompts)."""

from __future__ import annotations

from typing import Any

from orchmoe.data import MultiTaskData, PromptFormat, load_multitask, quiet_length_warning, tokenized_features
from orchmoe.recipe.args import ArgumentsError, DataArguments

__all__ = ["build_data", "data_arguments", "parse_unseen", "prompt_format", "run_metadata", "train_features"]


def parse_unseen(value: str) -> Any:
    """``--unseen-tasks``: 'all' (None), a number of tasks (0: none), or names / a file (read by the loader)."""
    text = str(value).strip()
    if text.lower() == "all":
        return None
    return int(text) if text.isdigit() else text


def parse_tasks(value: str, split: str) -> Any:
    """``--tasks``: 'all' (the split), a number to draw, or names / a file / a split (read by the loader)."""
    text = str(value).strip()
    if text.lower() == "all":
        return split
    if text.isdigit():
        if int(text) < 1:
            raise ArgumentsError(f"--tasks must be >= 1, got {text}")
        return int(text)
    if not text:
        raise ArgumentsError("--tasks is empty")
    return text


def data_arguments(options: dict[str, Any], **changes: Any) -> DataArguments:
    """The `DataArguments` of a run's options (a config.yaml mapping), with ``changes`` (None: kept) applied."""
    values = {k: v for k, v in options.items() if k in DataArguments.__dataclass_fields__}
    values.update({k: v for k, v in changes.items() if v is not None})
    for key in ("tasks", "unseen_tasks", "train_per_task"):
        if key in values:
            values[key] = "all" if values[key] is None else str(values[key])
    try:
        return DataArguments(**values)
    except TypeError as e:
        raise ArgumentsError(f"the run's options: {e}") from None


def build_data(data: DataArguments, seed: int) -> MultiTaskData:
    """Seen tasks (disjoint train / eval instances) and unseen test-split tasks, all seeded by ``seed``."""
    return load_multitask(
        data.data,
        parse_tasks(data.tasks, data.split),
        split=data.split,
        n_train=data.train_per_task,
        n_eval=data.eval_per_task,
        n_unseen_tasks=parse_unseen(data.unseen_tasks),
        seed=seed,
        n_unseen_eval=data.unseen_per_task,
        allow_fewer_train=data.allow_fewer_train,
        task_seed=data.task_seed,
        task_column=data.task_column,
    )


def train_features(data_args: DataArguments, data: MultiTaskData, tokenizer: Any, decoder_only: bool) -> Any:
    """``input_ids``, ``attention_mask``, ``labels`` and ``task_id`` of every training example as a
    ``datasets.Dataset``, tokenised once and cached on disk (keyed by the data, the tokenizer and the prompt)."""
    quiet_length_warning(tokenizer)
    return tokenized_features(
        data,
        tokenizer,
        n_pos=data_args.n_pos,
        max_source_len=data_args.max_source_len,
        max_target_len=data_args.max_target_len,
        chat_template=data_args.chat_template,
        decoder_only=decoder_only,
    )


def prompt_format(data_args: DataArguments, decoder_only: bool, max_new_tokens: int | None = None) -> PromptFormat:
    """How the run's prompts are built (training, evaluation, analysis, serving): saved with the adapter."""
    return PromptFormat(
        n_pos=data_args.n_pos,
        max_source_len=data_args.max_source_len,
        max_target_len=data_args.max_target_len,
        max_new_tokens=max_new_tokens,
        chat_template=data_args.chat_template,
        decoder_only=decoder_only,
    )


def run_metadata(data_args: DataArguments, data: MultiTaskData, info: dict, seed: int, fmt: PromptFormat) -> dict:
    """What the saved adapter records about its training data and prompts (its record's ``metadata``)."""
    return {
        "tasks": data.seen_tasks,
        "task_to_id": data.task_to_id,
        "unseen_tasks": data.unseen_tasks,
        "categories": data.categories(),
        "data": data_args.data,
        "data_dir": str(data.data_dir),
        "base_model": info["name"],
        "prompt_format": fmt.to_dict(),
        "seed": seed,
        "source_options": dict(getattr(data, "source_options", {}) or {}),
    }
