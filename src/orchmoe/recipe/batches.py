"""Batches of a training run: their order (a pure function of the seed and epoch, for exact resume),
each process's share, and the tensors a step feeds the model.

Why not a prepared DataLoader: exact resumption. The batch order of an epoch is a pure function of
``(seed, epoch)`` (task-mixing, length-grouped global batches of ``batch_size * num_processes``
examples, each process taking every W-th example of a global batch), and checkpoints are taken on
optimizer-step boundaries, so a run killed at any point resumes to bit-identical final weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orchmoe.core.routing import prompt_token_mask
from orchmoe.data import IGNORE_INDEX, length_grouped_batches, pad_batch

__all__ = ["epoch_batches", "rank_slice", "answer_window", "first_answer_position", "device_batch", "tokens_of"]

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    num_processes: int,
    seed: int,
    epoch: int,
    tasks: Sequence[int] | None = None,
    length_window: int = 4,
) -> list[list[int]]:
    """The global batches of one epoch, ``batch_size * num_processes`` examples each: every task spread
    evenly over the epoch, then lengths grouped within windows of ``length_window`` batches."""
    return length_grouped_batches(
        lengths,
        batch_size * num_processes,
        seed=seed * 1_000_003 + epoch,
        shuffle=True,
        mega_batch_mult=length_window,
        groups=tasks,
    )


def rank_slice(global_batch: Sequence[int], rank: int, num_processes: int) -> list[int]:
    """This process's share of a global batch: every W-th example (similar lengths on every rank).

    A short last batch is filled by cycling its own examples so no process gets an empty batch
    (DDP needs every rank to run the backward pass).
    """
    if num_processes == 1:
        return list(global_batch)
    g = list(global_batch)
    while len(g) < num_processes:
        g = g + g[: num_processes - len(g)]
    return g[rank::num_processes]


def tokens_of(features: Sequence[dict], decoder_only: bool) -> int:
    """Real tokens a batch of features feeds the model (prompt + answer), counted on the host."""
    return sum(len(f["input_ids"]) + (0 if decoder_only else len(f["labels"])) for f in features)


def device_batch(
    features: Sequence[dict], pad_id: int, device: torch.device, *, decoder_only: bool, with_task_ids: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs on ``device``, task ids on the host) of one micro-batch; pinned, non-blocking copies on a GPU."""
    batch = pad_batch(features, pad_id, "right", decoder_only=decoder_only)
    task_ids = batch.pop("task_ids")
    cuda = torch.device(device).type == "cuda"
    out = {
        k: (v.pin_memory() if cuda else v).to(device, non_blocking=True) for k, v in batch.items() if k in _MODEL_KEYS
    }
    if with_task_ids:
        out["task_ids"] = (task_ids.pin_memory() if cuda else task_ids).to(device, non_blocking=True)
    return out, task_ids


def answer_window(batch: dict[str, Any], first_answer: int) -> dict[str, Any]:
    """Decoder-only batch -> the same loss with the LM head run only from the first answer token on.

    The vocabulary projection and softmax over prompt positions are most of the cost of a short
    answer on a small model, and those positions carry no loss. ``first_answer`` (the earliest
    position of an answer token in the batch) comes from the host-side features, so no sync. The
    prompt mask for OrchMoE's routing is passed explicitly (the trimmed labels no longer mark the
    prompt), by the model's own rule (`orchmoe.core.routing.prompt_token_mask`).
    """
    labels, mask = batch["labels"], batch["attention_mask"]
    start = max(min(first_answer, labels.shape[1]) - 1, 0)  # logits at t predict token t+1
    out = dict(batch)
    out["routing_mask"] = prompt_token_mask(mask, labels, labels.shape, labels.device)
    out["labels"] = labels[:, start:]
    out["logits_to_keep"] = labels.shape[1] - start
    return out


def first_answer_position(features: Sequence[dict]) -> int:
    """Earliest position of a labelled token over a batch of decoder-only features (their length if none)."""
    longest = max(len(f["labels"]) for f in features)
    return min(next((i for i, t in enumerate(f["labels"]) if t != IGNORE_INDEX), longest) for f in features)


def label_tokens(feature: dict, decoder_only: bool) -> int:
    """Tokens a feature's LM loss averages over: its labelled tokens (a decoder-only model's loss shifts the labels
    by one, so the first position never counts)."""
    labels = feature["labels"][1:] if decoder_only else feature["labels"]
    return sum(t != IGNORE_INDEX for t in labels)
