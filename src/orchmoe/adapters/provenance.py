"""Where a base model came from, and a fingerprint that tells it from another one.

An adapter records its base model's *source* (the path or hub id that loads it: ``config._name_or_path``
of a model loaded with ``from_pretrained``), its portable *name*, and, for a checkpoint orchmoe converted
from a GGUF file, that file (the weights were dequantised from it, so they are not the hub's). The
*fingerprint* is the architecture (model type, widths, depth, vocabulary) plus a cheap hash of a strided
sample of the input embeddings: two checkpoints of one architecture (a base and its fine-tune, or another
quantisation) share the first and differ in the second, so an adapter loaded onto another base than the
one it was trained on is noticed (`orchmoe.adapters.folder` warns, or refuses when asked).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHITECTURE_KEYS",
    "base_model_provenance",
    "model_fingerprint",
    "model_source",
    "weights_sample_hash",
]

#: config fields that define a base model's shape (any of them differing makes an adapter unusable)
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "d_model",
    "n_embd",
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "num_decoder_layers",
    "intermediate_size",
    "d_ff",
)
_SAMPLE = 4096  # values of the input embeddings hashed for the fingerprint


def model_source(model: Any) -> str | None:
    """The path or hub id `from_pretrained` loaded ``model`` from (``config._name_or_path``), or None."""
    cfg = getattr(model, "config", None)
    source = getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or ""
    return str(source) or None


def base_model_provenance(source: str | None) -> dict[str, Any]:
    """What is known of a base model's origin: its source and, for a checkpoint orchmoe converted from a GGUF
    file, that file.

    Returns:
        ``{}`` without a source; else ``source`` and, for a GGUF conversion, ``dequantized_from_gguf``,
        ``converted_checkpoint`` and ``gguf_model_name`` (when known).
    """
    if not source:
        return {}
    out: dict[str, Any] = {"source": source}
    path = Path(source)
    if path.is_dir():
        from orchmoe.loading.gguf import read_marker

        marker = read_marker(path) or {}
        if str(marker.get("source", "")).lower().endswith(".gguf"):
            out["dequantized_from_gguf"] = marker["source"]
            out["converted_checkpoint"] = str(path)
            if marker.get("name"):
                out["gguf_model_name"] = marker["name"]
    return out


@torch.no_grad()
def weights_sample_hash(model: Any) -> str | None:
    """sha256 (16 hex digits) of a strided sample of the input embeddings, rounded to bf16; None without them.

    Cheap whatever the model's size (a few thousand values). Rounded to bf16 so that one checkpoint loaded in
    fp32 (a CPU) or bf16 (a GPU) hashes alike; another checkpoint of the same shape almost surely does not.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return None
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(torch.bfloat16).float().cpu().contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: Any, with_weights: bool = True) -> dict[str, Any]:
    """The base model's architecture fields (`ARCHITECTURE_KEYS`) and, with ``with_weights``, its
    ``weights_sample`` hash (`weights_sample_hash`)."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    out: dict[str, Any] = {k: d[k] for k in ARCHITECTURE_KEYS if k in d}
    if with_weights:
        sample = weights_sample_hash(model)
        if sample is not None:
            out["weights_sample"] = sample
    return out
