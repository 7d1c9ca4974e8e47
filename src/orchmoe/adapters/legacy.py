"""Adapter folders written by orchmoe 0.1 and 0.2 (``"format": "orchmoe-adapter"``), read into 0.3's form.

0.2 wrote the same tensor names as 0.3 under its own ``adapter_config.json`` (method fields under
``config``, the base model under ``base_model``, layer shapes under ``layers``, a file checksum); 0.1
also kept one allocation matrix per layer and a Task Router under ``task_router.``. Both load: the config
is converted (`config_from_legacy`), the tensors upgraded (`upgrade_legacy_tensors`), and a note says that
saving the adapter again writes the PEFT folder. Support ends in orchmoe 0.4 (CHANGELOG.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from orchmoe.core.config import AdapterConfig, ConfigError, config_from_dict

__all__ = ["LEGACY_FORMAT", "config_from_legacy", "is_legacy", "upgrade_legacy_tensors", "version_tuple"]

LEGACY_FORMAT = "orchmoe-adapter"


class LegacyAdapterError(ValueError):
    """A 0.1/0.2 adapter config that cannot be converted."""


def version_tuple(text: Any) -> tuple[int, ...]:
    """``"0.2.0"`` -> (0, 2, 0); anything unreadable -> (0,)."""
    try:
        return tuple(int(p) for p in str(text).split("+")[0].split(".")[:3] if p.isdigit())
    except ValueError:
        return (0,)


def is_legacy(meta: Any) -> bool:
    """Whether an ``adapter_config.json`` mapping is 0.1/0.2's own format."""
    return isinstance(meta, dict) and meta.get("format") == LEGACY_FORMAT


def config_from_legacy(meta: dict, where: str | os.PathLike) -> AdapterConfig:
    """The 0.3 config of a 0.1/0.2 adapter's metadata (its record filled from the old fields), with a note.

    Raises:
        LegacyAdapterError: the old metadata is malformed.
    """
    file = Path(where) / "adapter_config.json"
    for key in ("config", "layers"):
        if not isinstance(meta.get(key), dict):
            raise LegacyAdapterError(f"{file}: {key!r} must be a mapping")
    for key in ("base_model", "metadata"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise LegacyAdapterError(f"{file}: {key!r} must be a mapping, got {type(meta[key]).__name__}")
    fields = dict(meta["config"])
    version = version_tuple(meta.get("orchmoe_version"))
    if version < (0, 2) and fields.get("alpha") is None:
        # before 0.2 Poly, MHR and OrchMoE defaulted to alpha = 1 (scale 1/r), the others to alpha = rank
        if fields.get("method") in ("poly", "mhr", "orchmoe"):
            fields["alpha"] = 1.0
    elif fields.get("alpha") is None:
        raise LegacyAdapterError(f"{file}: the config has no 'alpha' (the update scale); orchmoe always records it")
    try:
        config = config_from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise LegacyAdapterError(f"{file}: invalid adapter config: {e}") from None
    base = dict(meta.get("base_model") or {})
    config.base_model_name_or_path = base.get("source") or base.get("name")
    config.orchmoe = {
        "orchmoe_version": meta.get("orchmoe_version"),
        "converted_from": LEGACY_FORMAT,
        "base_model": {"name": base.get("name"), **{k: v for k, v in base.items() if k != "name"}},
        "layers": meta["layers"],
        "metadata": meta.get("metadata") or {},
    }
    warnings.warn(
        f"{file} was written by orchmoe {meta.get('orchmoe_version')} (format {LEGACY_FORMAT!r}); it is converted "
        "on load. Save it again (model.save_pretrained(folder)) to write the PEFT folder of orchmoe >= 0.3; "
        "this conversion goes away in orchmoe 0.4",
        UserWarning,
        stacklevel=3,
    )
    return config


def upgrade_legacy_tensors(
    tensors: dict[str, torch.Tensor], layer_paths: list[str], method: str
) -> dict[str, torch.Tensor]:
    """orchmoe 0.1 kept one allocation matrix per layer (``<layer>.router.logits``) and the Task Router
    at ``task_router.*``; 0.2 and later keep all layers' logits in one (L, rows, h*S) tensor of the model
    router. Tensors already in that form are returned as they are."""
    per_layer = [f"{p}.router.logits" for p in layer_paths]
    out = dict(tensors)
    if method in ("poly", "mhr", "orchmoe") and per_layer and all(k in out for k in per_layer):
        target = "router.logits" if method in ("poly", "mhr") else "router.skill_router.logits"
        out[target] = torch.stack([out.pop(k) for k in per_layer])
    for k in [k for k in out if k.startswith("task_router.")]:
        out["router." + k] = out.pop(k)
    return out
