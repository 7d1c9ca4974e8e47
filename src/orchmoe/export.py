"""Leaving orchmoe: one routing's adapter as a standard PEFT LoRA, or merged into the base weights.

With parameter mixing, a fixed routing (a Poly/MHR task id, an OrchMoE abstract task or prompt)
collapses every layer to one rank-r LoRA pair (A_t, B_t), so the adapter runs anywhere PEFT runs.
Per-token routing (MoLoRA, MoDE) has no such form. The model answers which routing is fixed
(`RoutedModel.fixed_weights`); this module only writes or folds the result.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .fileio import atomic_write, atomic_write_text
from .layer import Conv1D

__all__ = ["export_peft_lora", "merge_and_unload"]


@torch.no_grad()
def export_peft_lora(model, path, **routing) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, path)` loads: adapter_config.json + adapter_model.safetensors.

    Args:
        model: a `RoutedModel` of a parameter-mixing method.
        path: the folder to write.
        **routing: the fixed routing (``task_id=`` for Poly/MHR; ``abstract_task=`` or ``input_ids=`` for OrchMoE).
    Returns:
        The folder.
    """
    allocations = model.fixed_weights(**routing)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, fan_in_fan_out = {}, False
    for p, layer in model.routed_layers.items():
        A_t, B_t = layer.mixed_weights(allocations[p])  # (1,P,r), (1,r,Q)
        tensors[f"base_model.model.{p}.lora_A.weight"] = A_t[0].T.contiguous().cpu()  # (r, P)
        tensors[f"base_model.model.{p}.lora_B.weight"] = B_t[0].T.contiguous().cpu()  # (Q, r)
        fan_in_fan_out |= bool(Conv1D) and isinstance(layer.base_layer, Conv1D)
    cfg = model.adapter_config
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": model.base_model_name,
        "r": cfg.rank,
        "lora_alpha": cfg.scale * cfg.rank,  # PEFT scales by lora_alpha / r
        "lora_dropout": 0.0,
        "target_modules": sorted(model.routed_layers),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    atomic_write_text(path / "adapter_config.json", json.dumps(peft_config, indent=2))
    return path


@torch.no_grad()
def merge_and_unload(model, **routing) -> nn.Module:
    """The base model with one routing's update added to its weights and the adapter layers removed."""
    allocations = model.fixed_weights(**routing)
    base = model.base_model
    for p, layer in model.routed_layers.items():
        delta = layer.delta_weight(allocations[p])  # (P, Q)
        weight = layer.base_layer.weight
        weight += (delta if isinstance(layer.base_layer, Conv1D) else delta.T).to(weight.dtype)
        parent_path, _, leaf = p.rpartition(".")
        setattr(base.get_submodule(parent_path) if parent_path else base, leaf, layer.base_layer)
    return base
