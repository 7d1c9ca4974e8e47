"""The recipe's data: the seeded multi-task split of a run, its training features, and the task
metadata saved with the adapter (so evaluation and analysis rebuild exactly the same sets)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from ..data import MultiTaskData, PromptFormat, load_multitask, tokenized_features
from .options import TrainConfig

__all__ = [
    "build_data",
    "train_features",
    "quiet_length_warning",
    "run_metadata",
    "prompt_settings",
    "prompt_format",
]


def build_data(cfg: TrainConfig) -> MultiTaskData:
    """Seen tasks (disjoint train / eval instances) and unseen test-split tasks, all seeded by cfg.seed."""
    tasks = cfg.split if cfg.tasks == "all" else cfg.tasks
    unseen = None if cfg.unseen_tasks == "all" else cfg.unseen_tasks
    return load_multitask(
        cfg.data,
        tasks,
        split=cfg.split,
        n_train=cfg.train_per_task,
        n_eval=cfg.eval_per_task,
        n_unseen_tasks=unseen,
        seed=cfg.seed,
        n_unseen_eval=cfg.unseen_per_task,
        allow_fewer_train=cfg.allow_fewer_train,
        task_seed=cfg.task_seed,
        task_column=cfg.task_column,
    )


def prompt_settings(cfg: TrainConfig) -> dict[str, Any]:
    """How prompts are built: the same for training, evaluation and analysis."""
    return {"n_pos": cfg.n_pos, "max_source_len": cfg.max_source_len, "chat_template": cfg.chat_template}


def prompt_format(cfg: TrainConfig, decoder_only: bool) -> PromptFormat:
    """The prompt format saved with the adapter (serving and prediction rebuild the training prompts from it)."""
    return PromptFormat(
        n_pos=cfg.n_pos,
        max_source_len=cfg.max_source_len,
        max_target_len=cfg.max_target_len,
        max_new_tokens=cfg.max_new_tokens,
        chat_template=cfg.chat_template,
        decoder_only=decoder_only,
    )


def quiet_length_warning(tokenizer) -> None:
    """Silence transformers' "sequence longer than the maximum" warning: prompts are tokenised whole
    and then cut to max_source_len by the prompt builder, so the warning is a false alarm."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def train_features(
    cfg: TrainConfig, data: MultiTaskData, tokenizer, decoder_only: bool, accelerator=None
) -> list[dict]:
    """``input_ids``, ``attention_mask``, ``labels`` and ``task_id`` of every training example, tokenised once
    and cached on disk (keyed by the data, the tokenizer and the prompt settings); with several processes
    the main one builds the cache and the others read it."""
    quiet_length_warning(tokenizer)
    with accelerator.main_process_first() if accelerator is not None else nullcontext():
        ds = tokenized_features(
            data, tokenizer, **prompt_settings(cfg), max_target_len=cfg.max_target_len, decoder_only=decoder_only
        )
    return ds.to_list()


def run_metadata(cfg: TrainConfig, data: MultiTaskData, info: dict) -> dict[str, Any]:
    """What the saved adapter records about its training data and prompts."""
    return {
        "tasks": data.seen_tasks,
        "task_to_id": data.task_to_id,
        "unseen_tasks": data.unseen_tasks,
        "categories": data.categories(),
        "data": cfg.data,
        "data_dir": str(data.data_dir),
        "base_model": info["name"],
        "prompt": {**prompt_settings(cfg), "max_target_len": cfg.max_target_len},
        "prompt_format": prompt_format(cfg, not info.get("is_encoder_decoder", False)).to_dict(),
        "seed": cfg.seed,
        "source_options": dict(getattr(data, "source_options", {}) or {}),
    }
