"""The adapter's state: its parameters and buffers, the two-speed optimiser groups, and writing and
reading them (`RoutedModel` inherits these; the model itself holds the layers and the routing)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from orchmoe.adapters.folder import (
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    model_fingerprint,
    read_adapter_tensors,
    upgrade_legacy_tensors,
    write_adapter,
)
from orchmoe.adapters.hub import base_model_provenance
from orchmoe.tuner.sharding import copy_into

__all__ = ["AdapterStateMixin", "DEFAULT_ROUTER_LR"]

#: learning rate of the allocation logits, as in every Poly/MHR reference config (adapters at 1e-3)
DEFAULT_ROUTER_LR = 0.1


class AdapterStateMixin:
    """What a `RoutedModel` trains, saves and loads: its experts, routers and the routers' statistics."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters (what trains): experts and per-layer routers keyed by base-model
        path, the model router under ``router.``. The saved adapter also holds `adapter_buffers()`."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.routed_layers.items():
            out[f"{path}.lora_A"] = layer.lora_A
            out[f"{path}.lora_B"] = layer.lora_B
            if layer.router is not None:
                for n, p in layer.router.named_parameters():
                    out[f"{path}.router.{n}"] = p
        if self.router is not None:
            for n, p in self.router.named_parameters():
                out[f"router.{n}"] = p
        return out

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Adapter state that is not trained but is needed to reproduce outputs (the Task Router's
        prompt-summary statistics). Saved, loaded and checkpointed with the weights."""
        if self.router is None:
            return {}
        return {f"router.{n}": b for n, b in self.router.named_buffers()}

    def num_parameters_split(self) -> tuple[int, int]:
        """(trainable adapter parameters, all parameters)."""
        adapter = sum(p.numel() for p in self.adapter_state_dict().values())
        total = sum(p.numel() for p in self.parameters())
        return adapter, total

    def print_trainable_parameters(self) -> None:
        """Print the adapter's and the whole model's parameter counts, as PEFT models do."""
        trainable, total = self.num_parameters_split()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" || method: {self.adapter_config.method}"
        )

    def parameter_groups(
        self, lr: float = 1e-3, router_lr: float | None = DEFAULT_ROUTER_LR, weight_decay: float = 0.0
    ) -> list[dict]:
        """Two-speed optimiser groups, as Poly's references train: the task-skill allocation logits
        (Poly/MHR Z, OrchMoE W_skill) at ``router_lr`` (0.1, 100x the adapters' 1e-3, as in every
        reference config; ``None``: same as ``lr``); experts and the dense routers (OrchMoE's Task
        Router, MoLoRA/MoDE token routers) at ``lr``. A dense projection of a d-wide input at the
        fast rate would move every logit by ~d*router_lr per Adam step and collapse the routing.

        Args:
            lr: learning rate of the experts and dense routers.
            router_lr: learning rate of the allocation logits.
            weight_decay: AdamW weight decay of the experts (routers get none).
        Returns:
            ``torch.optim`` parameter groups named ``experts``, ``allocation``, ``routers``.
        """
        fast = {id(p) for p in (self.router.allocation_parameters() if self.router is not None else [])}
        groups: dict[str, list] = {"experts": [], "allocation": [], "routers": []}
        for name, p in self.adapter_state_dict().items():
            if p.requires_grad:
                kind = (
                    "experts" if name.endswith((".lora_A", ".lora_B")) else "allocation" if id(p) in fast else "routers"
                )
                groups[kind].append(p)
        rates = {"experts": lr, "allocation": lr if router_lr is None else router_lr, "routers": lr}
        return [
            {"params": ps, "lr": rates[k], "weight_decay": weight_decay if k == "experts" else 0.0, "name": k}
            for k, ps in groups.items()
            if ps or k == "experts"
        ]

    def save_adapter(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """safetensors weights + JSON (method, sizes, base model, layer shapes), written atomically.

        Args:
            path: the adapter folder (created if needed).
            metadata: free-form JSON stored with it (``adapter_metadata`` after `orchmoe.load_adapter`).
        Returns:
            The folder.
        """
        params = self.adapter_state_dict()
        meta = {
            "method": self.adapter_config.method,
            "config": self.adapter_config.to_dict(),
            "base_model": {
                "name": self.base_model_name,
                **base_model_provenance(self.base_model_source),
                **model_fingerprint(self.model),
            },
            "layers": {k: list(v) for k, v in self.layer_shapes.items()},
            "trainable_parameters": sum(p.numel() for p in params.values()),
            "metadata": metadata or {},
        }
        return write_adapter(path, {**params, **self.adapter_buffers()}, meta)

    def load_adapter_weights(self, path: str | os.PathLike, legacy: bool = False) -> None:
        """Copy saved tensors into this model's adapter; any missing, extra or misshapen tensor is an error.

        Args:
            path: an adapter folder, or its ``adapter_model.safetensors`` file.
            legacy: the tensors were saved by orchmoe 0.1 (converted to the 0.2 layout first).
        Raises:
            AdapterMismatchError: missing, unexpected or misshapen tensors.
        """
        weights_file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
        loaded = read_adapter_tensors(weights_file)
        if legacy:
            loaded = upgrade_legacy_tensors(loaded, list(self.layer_shapes), self.adapter_config.method)
        own = {**self.adapter_state_dict(), **self.adapter_buffers()}
        missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        if missing or unexpected:
            raise AdapterMismatchError(
                f"{weights_file}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
            )
        with torch.no_grad():
            for k, p in own.items():
                if tuple(loaded[k].shape) != tuple(p.shape):
                    raise AdapterMismatchError(
                        f"{weights_file}: {k} has shape {tuple(loaded[k].shape)}, model expects {tuple(p.shape)}"
                    )
                copy_into(p, loaded[k])  # a sharded (FSDP) parameter takes its own slice

    def init_from_peft_lora(self, path: str | os.PathLike) -> None:
        """Start every skill (expert) equal to a PEFT LoRA adapter folder, so the model starts equal to it;
        see `orchmoe.adapters.peft_lora.init_from_peft_lora`."""
        from orchmoe.adapters.peft_lora import init_from_peft_lora

        init_from_peft_lora(self, path)
