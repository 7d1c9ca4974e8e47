"""The adapter folder: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, orchmoe's checks.

The folder is PEFT's: ``peft_type`` (``ORCHMOE_<METHOD>``), ``task_type``, ``base_model_name_or_path`` and
the method's fields, so ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` load it once orchmoe
is imported. Beside the method's fields the config carries orchmoe's *record* (its ``orchmoe`` field,
`adapter_record`): the orchmoe version, the adapted layers and their shapes, the base model's name,
provenance and fingerprint (`orchmoe.adapters.provenance`), free-form metadata (the recipe's tasks and
prompt format), and a checksum of the weights.

PEFT reads and writes the files; what goes in and what comes out passes through orchmoe's tuner hooks
(`orchmoe.tuner.model.RoutedModel._get_adapter_state_dict` / ``_remap_adapter_state_dict_for_load``), which
call this module: tensors are named as in orchmoe 0.2 (``<layer path>.lora_A``, ``router.<name>``), and a
load is refused unless every tensor is present, shaped for this model, finite and equal to the checksum.

`save_adapter` writes a folder as one unit (a temporary sibling, then `orchmoe.utils.fileio.replace_dir`):
a kill leaves the old adapter or the new one. `load_adapter` reads either format (0.1/0.2 folders are
converted, `orchmoe.adapters.legacy`), checks the base model's fingerprint, and leaves the caller's base
model as it was when anything fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchmoe.adapters.legacy import config_from_legacy, is_legacy, upgrade_legacy_tensors, version_tuple
from orchmoe.adapters.provenance import base_model_provenance, model_fingerprint, model_source
from orchmoe.core.config import ConfigError
from orchmoe.core.layer import RoutedLoraLayer
from orchmoe.utils.fileio import (
    FileFormatError,
    UnsafePathError,
    atomic_folder,
    check_replaceable,
    path_kind,
    read_json,
    recover_dir,
)
from orchmoe.version import __version__

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterMismatchError",
    "BaseModelMismatchWarning",
    "adapter_record",
    "adapter_tensors_for_load",
    "adapter_tensors_for_save",
    "describe_adapter_config",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "resolve_adapter_folder",
    "save_adapter",
    "tensor_digest",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: what an adapter folder written by orchmoe may hold besides its two files (PEFT's model card)
_FOLDER_EXTRAS = {"README.md"}


class AdapterMismatchError(ValueError):
    """An adapter folder that does not fit the model it is loaded onto, or cannot be read."""


class BaseModelMismatchWarning(UserWarning):
    """An adapter loaded onto a base model whose weights differ from those it was trained on."""


# -- the record and the checksum -----------------------------------------------------------------
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name): equal for equal contents,
    whichever file or process they came from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_record(tuner: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a saved adapter records beside its method's fields (the config's ``orchmoe`` field)."""
    source = tuner.adapter_config.base_model_name_or_path or model_source(tuner.model)
    return {
        "orchmoe_version": __version__,
        "base_model": {
            "name": tuner.base_model_name,
            **base_model_provenance(source),
            **model_fingerprint(tuner.model),
        },
        "layers": {k: list(v) for k, v in tuner.layer_shapes.items()},
        "trainable_parameters": sum(p.numel() for p in tuner.adapter_state_dict().values()),
        "metadata": dict(tuner.adapter_metadata or {}),
        "weights_sha256": tensor_digest(tensors),
    }


def _key_map(tuner: Any, model: nn.Module) -> dict[str, str]:
    """orchmoe's tensor name -> its key in ``model.state_dict()`` (``model``: the PeftModel, or the tuner)."""
    prefix = ""
    if model is not tuner:
        names = [n for n, m in model.named_modules() if m is tuner]
        if not names:
            raise TypeError(f"{type(model).__name__} does not hold this routed model")
        prefix = names[0] + "." if names[0] else ""
    out = {}
    for key in [*tuner.adapter_state_dict(), *tuner.adapter_buffers()]:
        out[key] = f"{prefix}router.{key[7:]}" if key.startswith("router.") else f"{prefix}model.{key}"
    return out


def adapter_tensors_for_save(tuner: Any, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """The adapter's tensors out of a state dict (PEFT's save hook), and the config's record refreshed.

    Raises:
        RuntimeError: the model was unloaded (its layers are gone: nothing to save).
        AdapterMismatchError: the state dict lacks some of the adapter's tensors.
    """
    tuner.check_usable()
    keys = _key_map(tuner, model)
    missing = [full for full in keys.values() if full not in state_dict]
    if missing:
        raise AdapterMismatchError(f"the state dict to save lacks adapter tensors {missing[:3]}")
    tensors = {ours: state_dict[full] for ours, full in keys.items()}
    tuner.adapter_config.orchmoe = adapter_record(tuner, tensors)
    return tensors


def _check_tensors(tuner: Any, tensors: dict[str, torch.Tensor], where: str, want_digest: Any) -> None:
    own = {**tuner.adapter_state_dict(), **tuner.adapter_buffers()}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterMismatchError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, p in own.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterMismatchError(f"{where}: {name} has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
        if p.is_floating_point() and not t.is_floating_point():  # copied into the weights, it would be cast silently
            raise AdapterMismatchError(f"{where}: {name} holds {t.dtype} values, not floating-point weights")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterMismatchError(f"{where}: tensor {name!r} holds NaN or infinite values")
    if isinstance(want_digest, str) and tensor_digest(tensors) != want_digest:
        raise AdapterMismatchError(
            f"{where} does not match the checksum in its {ADAPTER_CONFIG} (corrupted, or changed after it was "
            "saved; if you changed it on purpose, delete 'weights_sha256' from the config's 'orchmoe' record)"
        )


def adapter_tensors_for_load(tuner: Any, model: nn.Module, config: Any, state_dict: dict) -> dict:
    """The saved tensors checked against this model and keyed for ``model.load_state_dict`` (PEFT's load hook).

    Raises:
        AdapterMismatchError: missing, unexpected, misshapen or non-finite tensors, or a checksum mismatch.
    """
    record = config.orchmoe or {}
    tensors = dict(state_dict)
    if record.get("converted_from"):  # a 0.1/0.2 folder: 0.1's per-layer tensors upgraded
        tensors = upgrade_legacy_tensors(tensors, list(tuner.layer_shapes), tuner.adapter_config.method)
    where = getattr(tuner, "loading_from", None) or f"the adapter of {config.base_model_name_or_path or 'this model'}"
    digest = record.get("weights_sha256") if not record.get("converted_from") else None
    _check_tensors(tuner, tensors, where, digest)
    keys = _key_map(tuner, model)
    return {keys[name]: t for name, t in tensors.items()}


# -- reading a folder ----------------------------------------------------------------------------
def read_adapter_config(path: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of an adapter folder as a mapping, checked to be one orchmoe reads.

    Raises:
        FileNotFoundError: no folder or no config in it.
        AdapterMismatchError: unreadable, not an orchmoe adapter, or written by a newer major orchmoe.
    """
    folder = Path(path)
    recover_dir(folder)
    if path_kind(folder) not in ("folder", "symbolic link") or not folder.is_dir():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}: there is no adapter folder there")
    try:
        meta = read_json(folder / ADAPTER_CONFIG, "adapter config")
    except FileNotFoundError:
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}: not an adapter folder") from None
    except FileFormatError as e:
        raise AdapterMismatchError(str(e)) from None
    if not isinstance(meta, dict):
        raise AdapterMismatchError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    if is_legacy(meta):
        _check_layer_shapes_field(meta.get("layers"), folder / ADAPTER_CONFIG, "layers")
        version = meta.get("orchmoe_version")
    else:
        peft_type = str(meta.get("peft_type") or "")
        if not peft_type.startswith("ORCHMOE_"):
            raise AdapterMismatchError(
                f"{folder / ADAPTER_CONFIG} is not an orchmoe adapter (peft_type={meta.get('peft_type')!r}); a plain "
                "PEFT LoRA starts a routed mixture through get_model(base, config, init_lora=folder)"
            )
        _check_record(meta, folder / ADAPTER_CONFIG)
        version = (meta.get("orchmoe") or {}).get("orchmoe_version")
    if version_tuple(version)[:1] > version_tuple(__version__)[:1]:
        raise AdapterMismatchError(
            f"{folder / ADAPTER_CONFIG} was written by orchmoe {version}, a newer major version than this "
            f"orchmoe {__version__}: upgrade orchmoe to load it"
        )
    if version_tuple(version)[:2] > version_tuple(__version__)[:2]:
        warnings.warn(
            f"{folder / ADAPTER_CONFIG} was written by orchmoe {version}, newer than this orchmoe {__version__}; "
            "loading it anyway",
            stacklevel=2,
        )
    return meta


def _check_record(meta: dict, file: Path) -> None:
    """The orchmoe fields of a PEFT-format config: typed as orchmoe writes them (a hand edit is named)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = str(meta["peft_type"])
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        method = peft_type.removeprefix("ORCHMOE_").lower()
        raise AdapterMismatchError(
            f"{file}: invalid adapter config: unknown method {method!r} (peft_type {peft_type!r} is not registered)"
        )
    if meta.get("alpha") is None:
        raise AdapterMismatchError(f"{file}: the config has no 'alpha' (the update scale); orchmoe always records it")
    record = meta.get("orchmoe")
    if record is None:
        return
    if not isinstance(record, dict):
        raise AdapterMismatchError(f"{file}: 'orchmoe' must be a mapping")
    for key in ("layers", "base_model", "metadata"):
        if key in record and not isinstance(record[key], dict):
            raise AdapterMismatchError(f"{file}: 'orchmoe.{key}' must be a mapping, got {type(record[key]).__name__}")
    _check_layer_shapes_field(record.get("layers"), file, "orchmoe.layers")


def _check_layer_shapes_field(layers: Any, file: Path, field: str) -> None:
    """The recorded layer shapes (either format): a mapping of layer paths to [in, out] positive integers."""
    if layers is None:
        return
    if not isinstance(layers, dict):
        raise AdapterMismatchError(f"{file}: {field!r} must be a mapping, got {type(layers).__name__}")
    for key, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise AdapterMismatchError(
                f"{file}: layer {key!r} must have a shape [in, out] of two positive integers, got {shape!r}"
            )


def describe_adapter_config(meta: dict) -> dict[str, Any]:
    """The method, its fields and orchmoe's record of an ``adapter_config.json`` mapping (either format).

    Returns:
        ``{"method": name, "fields": {field: value}, "record": {...}}``; the record holds ``metadata``
        (the recipe's tasks and prompt format), ``base_model``, ``layers``.
    """
    if is_legacy(meta):
        record = {k: meta.get(k) for k in ("base_model", "layers", "metadata", "orchmoe_version")}
        return {"method": str(meta.get("method", "")), "fields": dict(meta.get("config") or {}), "record": record}
    record = dict(meta.get("orchmoe") or {})
    method = str(meta.get("peft_type", "")).removeprefix("ORCHMOE_").lower()
    return {"method": method, "fields": {k: v for k, v in meta.items() if k != "orchmoe"}, "record": record}


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of an adapter folder (or a .safetensors file); an unreadable file names itself."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if path_kind(file) is None:
        raise FileNotFoundError(f"no adapter weights at {file}")
    if not file.is_file():
        raise AdapterMismatchError(f"{file} is a {path_kind(file)}, not a weights file")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterMismatchError(
            f"{file} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None


# -- save ------------------------------------------------------------------------------------------
def save_adapter(model: Any, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the adapter folder as one unit: a kill at any moment leaves the old folder or the new one.

    Args:
        model: the PeftModel (`orchmoe.get_model`) or its `RoutedModel`.
        path: the adapter folder; an existing one is replaced only when it holds an adapter's files alone.
        metadata: free-form JSON kept in the record (``tuner.adapter_metadata`` after loading).
    Returns:
        The folder.
    Raises:
        UnsafePathError: ``path`` is not a folder, or holds files that are not an adapter's.
        RuntimeError: the model was unloaded.
    """
    path = Path(path)
    tuner = _tuner(model)
    tuner.check_usable()
    check_replaceable(path, "folder")
    if path.is_dir():
        foreign = sorted(
            p.name for p in path.iterdir() if p.name not in {ADAPTER_CONFIG, ADAPTER_WEIGHTS, *_FOLDER_EXTRAS}
        )
        if foreign:
            raise UnsafePathError(
                17, f"{path} holds files that are not an adapter's ({foreign[:3]}): refusing to replace it"
            )
    if metadata is not None:
        try:  # checked before anything changes: a refused save leaves the model as it was
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"save_adapter: metadata must be JSON (strings, numbers, lists, mappings): {e}") from None
        tuner.adapter_metadata = dict(metadata)
    with atomic_folder(path) as stage:
        model.save_pretrained(str(stage))
    return path


# -- load ------------------------------------------------------------------------------------------
def _check_base(meta: dict, config: Any, base_model: nn.Module, where: Path, base_mismatch: str) -> None:
    """The adapter's recorded base model against this one, before anything is built: architecture must match;
    weights warn or refuse. (The adapted layers are compared once the tuner has found them: `_check_layers`.)"""
    saved = (config.orchmoe or {}).get("base_model") or {}
    ours = model_fingerprint(base_model)
    arch = {k: (saved[k], ours[k]) for k in ours if k in saved and k != "weights_sample" and saved[k] != ours[k]}
    if arch:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in arch.items())
        raise AdapterMismatchError(f"adapter in {where} was saved for another model ({saved.get('name')!r}): {details}")
    sample = saved.get("weights_sample")
    if sample and ours.get("weights_sample") and sample != ours["weights_sample"]:
        msg = (
            f"adapter in {where} was trained on another base model than this one ({saved.get('name')!r}, "
            f"{saved.get('source')!r}): same architecture, different weights (a fine-tune, another quantisation "
            "or dtype?); its outputs will not be what was trained"
        )
        if base_mismatch == "error":
            raise AdapterMismatchError(msg + " (refused: base_mismatch='error')")
        if base_mismatch == "warn":
            warnings.warn(msg + " (pass base_mismatch='error' to refuse)", BaseModelMismatchWarning, stacklevel=4)


def _check_layers(config: Any, tuner: Any, where: Path) -> None:
    """The layers the tuner adapted (found once, as it injected them) against those the adapter was saved for."""
    want = {k: tuple(v) for k, v in ((config.orchmoe or {}).get("layers") or {}).items()}
    if want and tuner.layer_shapes != want:
        off = sorted(set(tuner.layer_shapes.items()) ^ set(want.items()))[:3]
        raise AdapterMismatchError(f"adapter in {where} was saved for other layers than this model has ({off})")


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    base_model_name: str | None = None,
    base_model_source: str | None = None,
    base_mismatch: str = "warn",
) -> Any:
    """Rebuild a saved adapter onto ``base_model`` as a ``peft.PeftModel``; a model of another shape is an error.

    Args:
        base_model: a fresh base model of the shape the adapter was saved for (left as it was on failure).
        path: the adapter folder (PEFT format, or an orchmoe 0.1/0.2 folder, converted with a note).
        is_trainable: keep the adapter trainable (default: frozen, eval mode).
        base_model_name: overrides the base model name recorded in the adapter.
        base_model_source: where this base model loads from (default: recorded, else its ``name_or_path``).
        base_mismatch: what a base of the same shape but other weights gets: "warn" (default), "error", "ignore".
    Returns:
        The PeftModel (``.base_model`` is the `RoutedModel`).
    Raises:
        FileNotFoundError / AdapterMismatchError: not an adapter folder, or one that does not fit.
    """
    if base_mismatch not in ("warn", "error", "ignore"):
        raise ValueError(f"base_mismatch must be 'warn', 'error' or 'ignore', got {base_mismatch!r}")
    if any(isinstance(m, RoutedLoraLayer) for m in base_model.modules()):
        raise ValueError(
            f"{type(base_model).__name__} already carries routed adapters: load onto a fresh base model "
            "(or the result of unload())"
        )
    folder = resolve_adapter_folder(path)
    meta = read_adapter_config(folder)
    config = adapter_config_from_meta(meta, folder)
    _check_base(meta, config, base_model, folder, base_mismatch)
    tensors = read_adapter_tensors(folder)
    _check_size(config, base_model, tensors, folder)
    config.inference_mode = not is_trainable
    try:
        model = _build_and_fill(base_model, config, folder, tensors)
    except BaseException:
        _restore(base_model)
        raise
    tuner = _tuner(model)
    if base_model_source:
        model.peft_config["default"].base_model_name_or_path = base_model_source
    if base_model_name:
        tuner.base_model_name = base_model_name
    model.train(is_trainable)
    return model


def adapter_config_from_meta(meta: dict, folder: Path) -> Any:
    """The config of an ``adapter_config.json`` mapping (PEFT format, or a 0.1/0.2 folder's, converted).

    Raises:
        AdapterMismatchError: an invalid or unknown config, naming the file.
    """
    from peft import PeftConfig

    if is_legacy(meta):
        try:
            return config_from_legacy(meta, folder)
        except ValueError as e:
            raise AdapterMismatchError(str(e)) from None
    try:
        return PeftConfig.from_peft_type(**meta)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise AdapterMismatchError(f"{folder / ADAPTER_CONFIG}: invalid adapter config: {e}") from None


def _check_size(config: Any, base_model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """What the config would allocate, bounded by what the weights file holds, before anything is allocated: a
    config edited to claim a million skills or a billion tasks would otherwise take all memory (a config of a few
    hundred bytes cannot be trusted with the size of what it builds)."""
    from orchmoe.core.budget import model_dims

    try:
        shapes, d_model = model_dims(base_model, config.target_modules)
        want = config.count_parameters(shapes, d_model)
    except (ConfigError, ValueError, TypeError, AttributeError):  # the build names what is wrong
        return
    have = sum(t.numel() for t in tensors.values())
    if want > 2 * have + (1 << 20):  # far more than the file: a slightly short file gets the tensor-by-tensor check
        raise AdapterMismatchError(
            f"{folder / ADAPTER_CONFIG} describes an adapter of {want:,} parameters on this model, but "
            f"{ADAPTER_WEIGHTS} holds {have:,} values: the config does not belong to these weights (edited or swapped?)"
        )


def _build_and_fill(base_model: nn.Module, config: Any, folder: Path, tensors: dict[str, torch.Tensor]) -> Any:
    """A PeftModel of ``config`` on ``base_model`` with the folder's tensors (PEFT's set_peft_model_state_dict)."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    source = config.base_model_name_or_path  # get_peft_model records the model's own name_or_path (maybe none)
    model = get_peft_model(base_model, config)
    model.peft_config["default"].base_model_name_or_path = model_source(base_model) or source
    tuner = _tuner(model)
    _check_layers(config, tuner, folder)
    tuner.loading_from = str(folder / ADAPTER_WEIGHTS)  # named by the load hook's errors
    try:
        set_peft_model_state_dict(model, tensors)  # the tuner's load hook checks them (adapter_tensors_for_load)
    finally:
        tuner.loading_from = None
    return model


def _restore(base_model: nn.Module) -> None:
    """Undo a half-finished load: the routed layers taken out of ``base_model`` again."""
    for path, module in list(base_model.named_modules()):
        if isinstance(module, RoutedLoraLayer):
            parent_path, _, leaf = path.rpartition(".")
            setattr(base_model.get_submodule(parent_path) if parent_path else base_model, leaf, module.base_layer)
    for hook_dict in (base_model._forward_pre_hooks, base_model._forward_hooks):
        for key in [
            k for k, h in hook_dict.items() if getattr(getattr(h, "func", None), "__module__", "").startswith("orchmoe")
        ]:
            del hook_dict[key]
    base_model.__dict__.pop("peft_config", None)


def _tuner(model: Any) -> Any:
    """The routed tuner of a PeftModel (its ``base_model``) or the tuner itself (it holds the routing state)."""
    for candidate in (model, getattr(model, "base_model", None)):
        if candidate is not None and "routing_state" in vars(candidate):
            return candidate
    raise TypeError(f"{type(model).__name__} is not an orchmoe model (build it with orchmoe.get_model)")


def resolve_adapter_folder(
    path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """A local adapter folder, or the adapter files of a Hub repository downloaded to the HF cache.

    Raises:
        FileNotFoundError: neither a local folder nor a repository that could be fetched (offline, unknown).
    """
    path = Path(path_or_repo).expanduser()
    text = str(path_or_repo)
    parts = text.split("/")
    looks_like_repo = 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~", "/"))
    if path.exists() or not looks_like_repo:
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter folder at {path} (no adapter_config.json)")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(text, revision=revision, token=token, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
        )
    except Exception as e:  # offline, unknown repo, auth: one clear error with the cause chained
        raise FileNotFoundError(
            f"{text!r} is not a local adapter folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
