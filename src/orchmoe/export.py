"""Leaving orchmoe: one task's routed adapter as a standard PEFT LoRA, or merged into the base weights.

With parameter mixing, a fixed routing (a Poly/MHR task id, an OrchMoE abstract
task or prompt) collapses every layer to one rank-r LoRA pair (A_t, B_t), so the
adapter runs anywhere PEFT runs. Per-token routing (MoLoRA, MoDE) has no such form.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig, OrchMoEConfig, PolyConfig
from .layer import Conv1D
from .model import RoutedModel, _atomic_write
from .routing import RoutingError

__all__ = ["fixed_allocations", "export_peft_lora", "merge_and_unload"]


@torch.no_grad()
def fixed_allocations(model: RoutedModel, *, task_id: int | None = None, abstract_task: int | None = None,
                      input_ids=None, attention_mask=None) -> dict[str, torch.Tensor | None]:
    """Evaluation-mode allocation weights (1, h, S) of every layer for one routing choice."""
    cfg = model.adapter_config
    layers = model.routed_layers
    if isinstance(cfg, LoraConfig):
        return {p: None for p in layers}
    if isinstance(cfg, PolyConfig):
        if task_id is None:
            raise RoutingError(f"exporting a {cfg.method} adapter needs task_id=... (0..{cfg.n_tasks - 1})")
        if not 0 <= task_id < cfg.n_tasks:
            raise RoutingError(f"task id {task_id} out of range: n_tasks={cfg.n_tasks}")
        return {p: layer.router.allocation(task_id)[None] for p, layer in layers.items()}
    if isinstance(cfg, OrchMoEConfig):
        if (abstract_task is None) == (input_ids is None):
            raise RoutingError("exporting an OrchMoE adapter needs exactly one of abstract_task=k or input_ids=<one prompt>")
        if abstract_task is not None:
            if not 0 <= abstract_task < cfg.n_abstract_tasks:
                raise RoutingError(f"abstract task {abstract_task} out of range: n_abstract_tasks={cfg.n_abstract_tasks}")
            pi = torch.zeros(1, cfg.n_abstract_tasks)
            pi[0, abstract_task] = 1.0
        else:
            was = model.training
            model.eval()
            ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
            mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1).to(model.device)
            pi = model.task_probabilities(ids, mask)
            model.train(was)
        out = {}
        for p, layer in layers.items():
            alloc = layer.router.allocation()  # (K, S)
            out[p] = (pi.to(alloc) @ alloc).unsqueeze(1)  # (1,K)@(K,S) -> (1,1,S)
        return out
    raise RoutingError(f"{cfg.method} routes every token separately: it cannot be written as one LoRA adapter")


@torch.no_grad()
def export_peft_lora(model: RoutedModel, path, **routing) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, path)` loads: adapter_config.json + adapter_model.safetensors."""
    allocations = fixed_allocations(model, **routing)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, fan_in_fan_out = {}, False
    layers = model.routed_layers
    for p, layer in layers.items():
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
        "target_modules": sorted(layers),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    _atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    _atomic_write(path / "adapter_config.json", lambda f: f.write_text(json.dumps(peft_config, indent=2)))
    return path


@torch.no_grad()
def merge_and_unload(model: RoutedModel, **routing) -> nn.Module:
    """The base model with one routing's update added to its weights and the adapter layers removed."""
    allocations = fixed_allocations(model, **routing)
    base = model.base_model
    for p, layer in model.routed_layers.items():
        delta = layer.delta_weight(allocations[p])  # (P, Q)
        weight = layer.base_layer.weight
        weight += (delta if isinstance(layer.base_layer, Conv1D) else delta.T).to(weight.dtype)
        parent_path, _, leaf = p.rpartition(".")
        setattr(base.get_submodule(parent_path) if parent_path else base, leaf, layer.base_layer)
    return base


