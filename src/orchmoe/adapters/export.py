"""Leaving orchmoe: one routing's adapter as a standard PEFT LoRA, or merged into the base weights.

With parameter mixing, a fixed routing (a Poly/MHR task id, an OrchMoE abstract task or prompt)
collapses every layer to one rank-r LoRA pair (A_t, B_t), so the adapter runs anywhere PEFT runs.
Per-token routing (MoLoRA, MoDE) has no such form. Free functions over orchmoe's tuner
(`orchmoe.tuner.model.RoutedModel`, whose thin methods call them): `fixed_weights` asks the router for
one routing's allocation, `export_peft_lora` writes it, `merge_and_unload` folds it into the base.

An export never destroys anything: a folder that holds files is replaced only with ``overwrite=True``,
an orchmoe adapter folder never (it would no longer load), and the folder is written as one unit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from orchmoe.adapters.provenance import base_model_provenance
from orchmoe.core.layer import Conv1D
from orchmoe.core.routing import RoutingError
from orchmoe.utils.fileio import UnsafePathError, atomic_write, atomic_write_text, check_replaceable, replace_dir

__all__ = ["EXPORT_NOTE", "export_peft_lora", "fixed_weights", "merge_and_unload", "prepare_output_folder"]

#: beside the PEFT files: where the base model comes from (a GGUF file it was dequantised from), which routing
EXPORT_NOTE = "orchmoe_export.json"


def prepare_output_folder(path: str | Path, overwrite: bool) -> Path:
    """Check that ``path`` may receive an export and return a fresh temporary sibling to write into
    (`replace_dir` then puts it in place as one unit).

    Raises:
        UnsafePathError: ``path`` is not a folder, holds an orchmoe adapter, or holds files without ``overwrite``.
    """
    path = Path(path)
    check_replaceable(path, "folder")
    if path.is_dir():
        config = path / "adapter_config.json"
        if config.is_file() and "ORCHMOE_" in config.read_text(encoding="utf-8", errors="replace")[:100000]:
            raise UnsafePathError(17, f"{path} holds an orchmoe adapter: exporting into it would replace it")
        if any(path.iterdir()) and not overwrite:
            raise UnsafePathError(17, f"{path} is not empty: choose an empty folder, or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


@torch.no_grad()
def export_peft_lora(model, path, *, overwrite: bool = False, **routing) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, path)` loads: adapter_config.json + adapter_model.safetensors.

    ``base_model_name_or_path`` is the base model's source (`RoutedModel.base_model_source`: a local path or a
    hub id), so ``peft.AutoPeftModelForCausalLM.from_pretrained(path)`` finds the base. `EXPORT_NOTE` and a
    README.md say which routing was exported and when the base weights were dequantised from a GGUF file
    (kept out of adapter_config.json, which PEFT would warn about).

    Args:
        model: the `RoutedModel` of a parameter-mixing method.
        path: the folder to write (absent or empty, or with ``overwrite``; never an orchmoe adapter folder).
        overwrite: replace a folder that holds files.
        **routing: the fixed routing (``task_id=`` for Poly/MHR; ``abstract_task=`` or ``input_ids=`` for OrchMoE).
    Returns:
        The folder.
    """
    allocations = fixed_weights(model, **routing)
    path = Path(path)
    tmp = prepare_output_folder(path, overwrite)
    try:
        _write_lora(model, tmp, allocations, routing)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


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
    if model.router is None:
        raise RoutingError(
            f"{model.adapter_config.method} routes every token separately: it cannot be written as one LoRA adapter"
        )
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
