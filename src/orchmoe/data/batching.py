"""Padding tokenised examples into a batch: the one collation the Trainer's collator, evaluation and
serving share, so the three pad (and mask) a prompt the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from orchmoe.data.prompts import IGNORE_INDEX


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            out[i, : len(s)] = t
        else:
            out[i, length - len(s) :] = t
    return out


def pad_batch(
    features: Sequence[Mapping[str, Any]],
    pad_id: int,
    padding_side: str = "right",
    *,
    decoder_only: bool = True,
) -> dict[str, Any]:
    """Pad a list of encoded examples into tensors.

    * ``input_ids`` padded with ``pad_id`` on ``padding_side`` (use "left" for decoder-only
      generation so every prompt ends at the last position; "right" is fine for training);
      ``attention_mask`` (given or all ones) padded with 0.
    * ``labels`` padded with -100: decoder-only labels are aligned with ``input_ids`` (same side,
      same length); encoder-decoder labels are right-padded to their own length.
    * ``task_id`` / ``task_ids`` (an int per example) become ``task_ids``, a LongTensor (B,).
    * Any other key: ints become a LongTensor, anything else is returned as a list.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("cannot collate an empty batch")
    ids = [f["input_ids"] for f in features]
    length = max(len(s) for s in ids)
    masks = [f.get("attention_mask", [1] * len(s)) for f, s in zip(features, ids)]
    batch: dict[str, Any] = {
        "input_ids": _pad(ids, pad_id, padding_side, length),
        "attention_mask": _pad(masks, 0, padding_side, length),
    }
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        if decoder_only:
            bad = [i for i, (lab, s) in enumerate(zip(labels, ids)) if len(lab) != len(s)]
            if bad:
                raise ValueError(f"decoder-only features {bad[:5]} have labels of another length than input_ids")
            batch["labels"] = _pad(labels, IGNORE_INDEX, padding_side, length)
        else:
            batch["labels"] = _pad(labels, IGNORE_INDEX, "right", max(len(lab) for lab in labels))
    for key in features[0]:
        if key in ("input_ids", "attention_mask", "labels"):
            continue
        values = [f[key] for f in features]
        name = "task_ids" if key in ("task_id", "task_ids") else key
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch
