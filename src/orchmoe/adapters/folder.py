"""The adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json``.

Reading validates everything before a tensor reaches a model: the JSON's structure and types, the
orchmoe version that wrote it, the tensor file's integrity (its sha256, recorded in the config) and
that every value is finite.
Adapters written by orchmoe 0.1 (per-layer router logits, method-specific default scales) are
upgraded on the fly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from orchmoe.core.config import ConfigError, config_from_dict
from orchmoe.utils.fileio import atomic_write, atomic_write_text, sha256_file
from orchmoe.version import __version__

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterMismatchError",
    "write_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "adapter_config_from_meta",
    "upgrade_legacy_tensors",
    "model_fingerprint",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "orchmoe-adapter"
_FINGERPRINT_KEYS = (
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


class AdapterMismatchError(ValueError):
    """An adapter file that does not fit the model it is loaded onto, or cannot be read."""


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    return {k: d[k] for k in _FINGERPRINT_KEYS if k in d}


def _version(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split("+")[0].split(".")[:3])
    except ValueError:
        return (0,)


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write both files atomically (weights first: a config never points at missing weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(cpu, str(p), metadata={"format": "pt"}))
    # the weights' checksum: a flipped bit that still reads as a finite number is caught on load
    checksum = sha256_file(path / ADAPTER_WEIGHTS)
    meta = {"format": FORMAT, "orchmoe_version": __version__, **meta, "weights_sha256": checksum}
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(meta, indent=2, sort_keys=True))
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The validated ``adapter_config.json`` of an adapter folder."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}: not an orchmoe adapter folder")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatchError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterMismatchError(f"{file} is not an orchmoe adapter config (format={fmt!r})")
    bad = [k for k in ("config", "layers") if not isinstance(meta.get(k), dict)]
    if bad:
        raise AdapterMismatchError(f"{file}: {' and '.join(repr(k) for k in bad)} must be a mapping")
    for key, shape in meta["layers"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise AdapterMismatchError(
                f"{file}: layer {key!r} must have a shape [in, out] of two positive integers, got {shape!r}"
            )
    for key in ("base_model", "metadata"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise AdapterMismatchError(f"{file}: {key!r} must be a mapping, got {type(meta[key]).__name__}")
    saved, ours = _version(meta.get("orchmoe_version")), _version(__version__)
    if saved[:1] > ours[:1]:
        raise AdapterMismatchError(
            f"{file} was written by orchmoe {meta.get('orchmoe_version')}, a newer major "
            f"version than this orchmoe {__version__}: upgrade orchmoe to load it"
        )
    if saved > ours:
        warnings.warn(
            f"{file} was written by orchmoe {meta.get('orchmoe_version')}, newer than this orchmoe "
            f"{__version__}; loading it anyway",
            stacklevel=2,
        )
    return meta


def adapter_config_from_meta(meta: dict, where: str | os.PathLike = "adapter"):
    """The AdapterConfig of an adapter's metadata, with 0.1-era defaults made explicit."""
    cfg = dict(meta["config"])
    if _version(meta.get("orchmoe_version")) < (0, 2) and cfg.get("alpha") is None:
        # before 0.2 Poly, MHR and OrchMoE defaulted to alpha = 1 (scale 1/r), the others to alpha = rank
        if cfg.get("method") in ("poly", "mhr", "orchmoe"):
            cfg["alpha"] = 1.0
    elif "alpha" not in cfg or cfg.get("alpha") is None:
        raise AdapterMismatchError(
            f"{Path(where) / ADAPTER_CONFIG}: the config has no 'alpha' (the update scale); "
            "an adapter written by orchmoe always records it"
        )
    try:
        return config_from_dict(cfg)
    except (ConfigError, TypeError) as e:
        raise AdapterMismatchError(f"{Path(where) / ADAPTER_CONFIG}: invalid adapter config: {e}") from None


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights file of an adapter folder (or a .safetensors file); corrupt or non-finite data is an error."""
    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no adapter weights at {file}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterMismatchError(
            f"{file} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterMismatchError(f"{file}: tensor {name!r} holds NaN or infinite values")
    _check_sha256(file)
    return tensors


def _check_sha256(file: Path) -> None:
    """Compare the weights with the checksum their adapter_config.json recorded (older adapters have none)."""
    try:
        want = json.loads((file.parent / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return  # no readable config beside it: read_adapter_config reports that where it matters
    if isinstance(want, str) and sha256_file(file) != want:
        raise AdapterMismatchError(
            f"{file} does not match the checksum in its {ADAPTER_CONFIG} (corrupted, or changed after it was "
            "saved; if you changed it on purpose, delete 'weights_sha256' there)"
        )


def upgrade_legacy_tensors(
    tensors: dict[str, torch.Tensor], layer_paths: list[str], method: str
) -> dict[str, torch.Tensor]:
    """orchmoe 0.1 kept one allocation matrix per layer (``<layer>.router.logits``) and the Task Router
    at ``task_router.*``; 0.2 keeps all layers' logits in one (L, rows, h*S) tensor of the model router."""
    per_layer = [f"{p}.router.logits" for p in layer_paths]
    out = dict(tensors)
    if method in ("poly", "mhr", "orchmoe") and all(k in out for k in per_layer):
        target = "router.logits" if method in ("poly", "mhr") else "router.skill_router.logits"
        out[target] = torch.stack([out.pop(k) for k in per_layer])
    for k in [k for k in out if k.startswith("task_router.")]:
        out["router." + k] = out.pop(k)
    return out
