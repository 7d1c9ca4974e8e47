"""Batches of encoded examples for the Trainer: padded tensors, and each example's task where it matters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchmoe.data import pad_batch

__all__ = ["RoutedDataCollator"]

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class RoutedDataCollator:
    """Pads ``input_ids`` / ``attention_mask`` / ``labels`` (labels with -100) on the right, and passes each
    example's ``task_id``: as ``task_ids`` to a method that routes by it (Poly, MHR), else as
    ``orchmoe_task_labels``, read only by the routing diagnostics (OrchMoE's NMI with the tasks) and never
    passed to the transformers model.

    Args:
        pad_token_id: the tokenizer's pad id.
        decoder_only: labels aligned with ``input_ids`` (decoder-only) or their own length (encoder-decoder).
        routes_by_task: whether the method needs ``task_ids``.
    """

    pad_token_id: int
    decoder_only: bool = True
    routes_by_task: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_batch(
            [{k: f[k] for k in _MODEL_KEYS if k in f} for f in features],
            self.pad_token_id,
            "right",
            decoder_only=self.decoder_only,
        )
        if features and "task_id" in features[0]:
            tasks = torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long)
            batch["task_ids" if self.routes_by_task else "orchmoe_task_labels"] = tasks
        return batch
