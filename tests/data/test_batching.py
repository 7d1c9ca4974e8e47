"""Padding tokenised examples into batches (:mod:`orchmoe.data.batching`)."""

from __future__ import annotations

import pytest
import torch

from orchmoe.data import IGNORE_INDEX, encode_example, encode_prompt, pad_batch


def test_pad_batch_right_for_training(tok, make_task):
    task = make_task()
    feats = [encode_example(tok, task, "hi", "ih"), encode_example(tok, task, "a much longer input", "x y z")]
    feats[0]["task_id"], feats[1]["task_id"] = 3, 5
    batch = pad_batch(feats, tok.pad_token_id, "right")
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (max(n0, n1) - n)
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == feats[short]["labels"]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [3, 5]


def test_pad_batch_left_for_generation(tok, make_task):
    task = make_task()
    prompts = [encode_prompt(tok, task, "hi"), encode_prompt(tok, task, "a much longer input than that")]
    batch = pad_batch([{"input_ids": p, "index": i} for i, p in enumerate(prompts)], tok.pad_token_id, "left")
    width = max(map(len, prompts))
    for row, p in enumerate(prompts):
        assert batch["input_ids"][row, width - len(p) :].tolist() == p  # every prompt ends at the last column
        assert batch["attention_mask"][row].tolist() == [0] * (width - len(p)) + [1] * len(p)
    assert batch["index"].tolist() == [0, 1]
    assert "labels" not in batch


def test_pad_batch_encoder_decoder_labels_padded_separately(tok, make_task):
    task = make_task()
    feats = [
        encode_example(tok, task, "hi", "a b c d e f", decoder_only=False),
        encode_example(tok, task, "a much longer input", "x", decoder_only=False),
    ]
    batch = pad_batch(feats, tok.pad_token_id, "right", decoder_only=False)
    assert batch["labels"].shape == (2, len(feats[0]["labels"]))
    assert batch["labels"][1].tolist() == feats[1]["labels"] + [IGNORE_INDEX] * (
        len(feats[0]["labels"]) - len(feats[1]["labels"])
    )
    with pytest.raises(ValueError, match="labels of another length"):
        pad_batch(feats, tok.pad_token_id, "right", decoder_only=True)
