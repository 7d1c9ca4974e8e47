"""Leaving orchmoe: one routing's adapter as a standard PEFT LoRA, or merged into the base weights.

With parameter mixing, a fixed routing (a Poly/MHR task id, an OrchMoE abstract task or prompt)
collapses every layer to one rank-r LoRA pair (A_t, B_t), so the adapter runs anywhere PEFT runs.
Per-token routing (MoLoRA, MoDE) has no such form. Free functions over orchmoe's tuner
(`orchmoe.tuner.model.RoutedModel`, whose thin methods call them): `fixed_weights` asks the router for
one routing's allocation, `export_peft_lora` writes it, `merge_and_unload` folds it into the base.

An export never destroys anything (`check_destination`, also used by the bundle of `orchmoe.adapters.bundle`): a
folder that holds files is replaced only with ``overwrite=True`` and only when it holds an earlier export, the
adapter being exported is never inside, around or at the destination, and the folder is written as one unit
(`orchmoe.utils.fileio.atomic_folder`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from orchmoe.adapters.provenance import base_model_provenance
from orchmoe.core.layer import Conv1D
from orchmoe.core.routing import RoutingError
from orchmoe.utils.fileio import atomic_folder, atomic_write, atomic_write_text, path_kind

__all__ = [
    "EXPORT_NOTE",
    "ExportError",
    "check_destination",
    "export_peft_lora",
    "fixed_weights",
    "merge_and_unload",
    "refuse_token_routing",
]

#: beside the PEFT files: where the base model comes from (a GGUF file it was dequantised from), which routing
EXPORT_NOTE = "orchmoe_export.json"


class ExportError(ValueError):
    """An export destination that would destroy something, or an export that cannot be written."""


#: a multi-LoRA bundle's manifest (`orchmoe.adapters.bundle`): its name and ``format``, how an earlier export is known
BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = "orchmoe-lora-bundle"
#: the other files of a bundle (`orchmoe.adapters.bundle.names`): its README, router, and one LoRA folder per routing
BUNDLE_README, BUNDLE_ROUTER_CONFIG, BUNDLE_ROUTER_WEIGHTS, BUNDLE_LORAS = (
    "README.md",
    "router.json",
    "router.safetensors",
    "loras",
)
#: what an export of one routing holds (also each LoRA folder of a bundle)
EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", EXPORT_NOTE, "README.md")


def refuse_token_routing(method: str, routing: str) -> None:
    """Raise `RoutingError` for a method whose routing has no LoRA form (MoLoRA, MoDE: per-token routing)."""
    if routing == "tokens":
        raise RoutingError(
            f"{method} routes every token separately: its gates mix the experts' outputs inside every layer, token "
            "by token, so no fixed LoRA (one per request) computes what it computes, and it cannot be exported as "
            "LoRA adapters; serve it with orchmoe itself (orchmoe serve)"
        )


def _is_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / BUNDLE_MANIFEST).read_text(encoding="utf-8")).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_export(folder: Path) -> bool:
    """A folder orchmoe wrote as an export: one exported LoRA (its note) or a bundle (its manifest)."""
    return (folder / EXPORT_NOTE).is_file() or _is_bundle(folder)


def _not_written_by_export(folder: Path) -> list[str]:
    """The files of an earlier export that no export writes (a user's notes put there): an overwrite, which
    replaces the whole folder, would delete them."""
    bundle = _is_bundle(folder)
    top = {BUNDLE_MANIFEST, BUNDLE_README, BUNDLE_ROUTER_CONFIG, BUNDLE_ROUTER_WEIGHTS} if bundle else set(EXPORT_FILES)

    def written(parts: tuple[str, ...], is_folder: bool) -> bool:
        if bundle and parts[0] == BUNDLE_LORAS:  # loras/, loras/<name>/, loras/<name>/<an export's file>
            return is_folder if len(parts) <= 2 else len(parts) == 3 and parts[2] in EXPORT_FILES and not is_folder
        return len(parts) == 1 and parts[0] in top and not is_folder

    out = []
    for p in sorted(folder.rglob("*")):
        is_folder = path_kind(p) == "folder"
        if not written(p.relative_to(folder).parts, is_folder) and not (is_folder and any(p.iterdir())):
            out.append(p.relative_to(folder).as_posix())
    return out


def check_destination(out: str | os.PathLike, *, overwrite: bool, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an export destination that would destroy something; return it resolved.

    Args:
        out: the folder to write.
        overwrite: replace an earlier orchmoe export there.
        protect: folders that must stay untouched (the adapter exported): the destination may be none of them,
            inside none and contain none.
    Returns:
        The absolute destination.
    Raises:
        ExportError: a protected folder in the way, something other than a folder there, or a non-empty folder
            that may not be replaced (without ``overwrite``, or not an earlier export).
    """
    if not str(out).strip():
        raise ExportError("the export folder is empty (''): name a folder to export into")
    dest = Path(out).expanduser().absolute()
    kind = path_kind(dest)
    if kind not in (None, "folder"):
        raise ExportError(f"{dest} is a {kind}, not a folder: choose another folder to export into")
    dest = dest.resolve()
    for folder in protect:
        kept = Path(folder).expanduser().resolve()
        if dest == kept or dest.is_relative_to(kept) or kept.is_relative_to(dest):
            where = (
                "the adapter folder itself"
                if dest == kept
                else f"inside the adapter folder {kept}"
                if dest.is_relative_to(kept)
                else f"a folder around the adapter folder {kept}"
            )
            raise ExportError(
                f"refusing to export into {dest}: it is {where}, which the export reads and must not change; "
                "choose another folder"
            )
    if kind == "folder" and any(dest.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{dest} exists and is not empty: pass --overwrite (overwrite=True) to replace an earlier export there"
            )
        if not _is_export(dest):
            raise ExportError(
                f"{dest} holds files that are not an orchmoe export; overwrite only replaces an earlier export "
                "(choose another folder, or empty it yourself)"
            )
        foreign = _not_written_by_export(dest)
        if foreign:
            raise ExportError(
                f"{dest} holds an earlier export and files no export writes ({', '.join(foreign[:3])}): overwrite "
                "would delete them; move them out first"
            )
    return dest


@torch.no_grad()
def export_peft_lora(model, path, *, overwrite: bool = False, protect: Iterable = (), **routing) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, path)` loads: adapter_config.json + adapter_model.safetensors.

    ``base_model_name_or_path`` is the base model's source (`RoutedModel.base_model_source`: a local path or a
    hub id), so ``peft.AutoPeftModelForCausalLM.from_pretrained(path)`` finds the base. `EXPORT_NOTE` and a
    README.md say which routing was exported and when the base weights were dequantised from a GGUF file
    (kept out of adapter_config.json, which PEFT would warn about).

    Args:
        model: the `RoutedModel` of a parameter-mixing method.
        path: the folder to write (absent or empty; with ``overwrite``, an earlier export; `check_destination`).
        overwrite: replace an earlier export there.
        protect: folders the export may not touch (the adapter exported).
        **routing: the fixed routing (``task_id=`` for Poly/MHR; ``abstract_task=`` or ``input_ids=`` for OrchMoE).
    Returns:
        The folder.
    """
    cfg = model.adapter_config
    refuse_token_routing(cfg.method, cfg.routing)
    allocations = fixed_weights(model, **routing)  # a bad routing fails before anything is written
    dest = check_destination(path, overwrite=overwrite, protect=protect)
    with atomic_folder(dest) as stage:
        _write_lora(model, stage, allocations, routing)
    return dest


def _write_lora(model, path: Path, allocations: dict, routing: dict) -> None:
    tensors, fan_in_fan_out = {}, False
    for p, layer in model.routed_layers.items():
        A_t, B_t = layer.mixed_weights(allocations[p])  # (1,P,r), (1,r,Q)
        tensors[f"base_model.model.{p}.lora_A.weight"] = A_t[0].T.contiguous().cpu()  # (r, P)
        tensors[f"base_model.model.{p}.lora_B.weight"] = B_t[0].T.contiguous().cpu()  # (Q, r)
        fan_in_fan_out |= bool(Conv1D) and isinstance(layer.base_layer, Conv1D)
    cfg = model.adapter_config
    source = cfg.base_model_name_or_path or model.base_model_name
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": source,
        "r": cfg.rank,
        "lora_alpha": cfg.scale * cfg.rank,  # PEFT scales by lora_alpha / r
        "lora_dropout": 0.0,
        "target_modules": sorted(model.routed_layers),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    provenance = {
        "orchmoe_method": cfg.method,
        "routing": {k: _plain(v) for k, v in routing.items()},
        "base_model_name": model.base_model_name,
        **base_model_provenance(source),
    }
    atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    atomic_write_text(path / "adapter_config.json", json.dumps(peft_config, indent=2))
    atomic_write_text(path / EXPORT_NOTE, json.dumps(provenance, indent=2))
    atomic_write_text(path / "README.md", _export_card(peft_config, provenance))


def _plain(value):
    """A routing argument as JSON (a prompt's ids as a list)."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _export_card(peft_config: dict, provenance: dict) -> str:
    """README.md of an exported folder: which base it needs, and when that base was dequantised from GGUF."""
    lines = [
        f"# LoRA exported from an orchmoe {provenance['orchmoe_method']} adapter",
        "",
        (
            f"One fixed routing ({provenance['routing'] or 'the single expert'}) written as a standard PEFT LoRA "
            f"for the base model `{peft_config['base_model_name_or_path']}` ({provenance['base_model_name']}):"
        ),
        "`peft.AutoPeftModelForCausalLM.from_pretrained(<this folder>)` loads both.",
    ]
    if "dequantized_from_gguf" in provenance:
        lines += [
            "",
            (
                f"The base weights were dequantised from the GGUF file `{provenance['dequantized_from_gguf']}` "
                f"into the cached checkpoint `{provenance['converted_checkpoint']}`: they are not the original "
                "full-precision weights, and this adapter was trained against the dequantised ones."
            ),
        ]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def merge_and_unload(model, **routing) -> nn.Module:
    """The base model with one routing's update added to its weights and the adapter layers removed
    (`RoutedModel.unload`).

    Args:
        model: the `RoutedModel` of a parameter-mixing method (not usable afterwards).
        **routing: the fixed routing, as `export_peft_lora`.
    Returns:
        The base model with merged weights.
    """
    allocations = fixed_weights(model, **routing)
    for p, layer in model.routed_layers.items():
        delta = layer.delta_weight(allocations[p])  # (P, Q)
        weight = layer.base_layer.weight
        weight += (delta if isinstance(layer.base_layer, Conv1D) else delta.T).to(weight.dtype)
    return model.unload()


def fixed_weights(model, *, input_ids=None, attention_mask=None, **routing) -> dict[str, torch.Tensor | None]:
    """Evaluation-mode allocation (1, h, S) of every layer for one fixed routing (a Poly/MHR task_id, an
    OrchMoE abstract_task or one prompt's input_ids); None per layer for LoRA. Per-token routing has none.

    Args:
        input_ids: one prompt, (n,) or (1, n), routed by OrchMoE's Task Router in evaluation mode.
        attention_mask: that prompt's mask, (n,) or (1, n).
        **routing: the router's own (``task_id=`` for Poly/MHR, ``abstract_task=`` for OrchMoE).
    Returns:
        Layer path -> (1, h, S) weights (None for LoRA).
    Raises:
        RoutingError: per-token routing (MoLoRA, MoDE), a batch of prompts, or a routing the router refuses.
    """
    refuse_token_routing(model.adapter_config.method, model.adapter_config.routing)
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise RoutingError(f"export routes by one prompt; got a batch of {ids.shape[0]}")
        ids = ids.reshape(1, -1).to(model.device)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1).to(model.device)
        was = model.router.training
        model.router.eval()
        with torch.no_grad():
            routing["task_probs"] = model.task_probabilities(ids, mask)
        model.router.train(was)
    with torch.no_grad():
        w = model.router.fixed_weights(**routing)
    return {p: (None if w is None else w[i]) for i, p in enumerate(model.routed_layers)}
