"""The router of a bundle: which LoRA a request uses, without loading the adapter's experts.

OrchMoE routes from the prompt: pi(x) = TaskRouter(u(x)), with u(x) the masked mean of the base model's
frozen input embeddings over the prompt tokens. A bundle keeps the Task Router's weights and running
statistics (``router.safetensors``) and its settings (``router.json``); `BundleRouter` rebuilds it beside
any copy of the base model's input embeddings (the base model itself, or its embedding table alone) and
answers the LoRA name of each prompt: the argmax of pi, mapped through the manifest. Poly/MHR route by the
task (a training task's name or id; anything else is an unseen task); LoRA has one routing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from orchmoe.adapters.bundle.names import ROUTER_CONFIG, ROUTER_WEIGHTS, BundleError, BundleManifest
from orchmoe.core.routers.task import TaskRouter
from orchmoe.utils.fileio import atomic_write, atomic_write_text

__all__ = ["BundleRouter", "router_description", "write_router"]

ROUTER_KIND = {"prompt": "orchmoe-task-router", "task_ids": "task", "none": "none"}


def router_description(model) -> dict[str, Any]:
    """``router.json`` of a model (`write_router`), without the file."""
    cfg = model.adapter_config
    out: dict[str, Any] = {"method": cfg.method, "kind": ROUTER_KIND[cfg.routing]}
    if cfg.routing == "prompt":
        out.update(
            d_model=model.task_router.d_model,
            n_abstract_tasks=cfg.n_abstract_tasks,
            temperature=cfg.task_temperature,
            hidden=cfg.task_router_hidden,
            hard=cfg.hard_routing,
            prompt_norm=cfg.prompt_norm,
            weights=ROUTER_WEIGHTS,
            input=(
                "u(x): the mean of the base model's input embeddings (fp32) over the prompt's attended tokens; "
                "pi(x) = softmax(TaskRouter(u(x))), one-hot when hard; the LoRA is the manifest's for argmax pi"
            ),
        )
    elif cfg.routing == "task_ids":
        out.update(n_tasks=cfg.n_tasks, unseen="task id -1: every task not among the training tasks")
    return out


def write_router(model, folder: str | os.PathLike) -> None:
    """Write ``router.json`` (and OrchMoE's ``router.safetensors``: the Task Router's weights and statistics).

    Args:
        model: the `RoutedModel` exported.
        folder: the bundle being written.
    """
    folder = Path(folder)
    desc = router_description(model)
    if model.adapter_config.routing == "prompt":
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.task_router.state_dict().items()}
        atomic_write(folder / ROUTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(folder / ROUTER_CONFIG, json.dumps(desc, indent=2) + "\n")


def prompt_summary(embeddings: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """u(x): the masked mean of the input embeddings, (b, d) fp32 (as `RoutedModel.prompt_summary` computes it)."""
    with torch.no_grad():
        emb = embeddings(input_ids).float()  # (b, n, d)
    mask = torch.ones(emb.shape[:2], device=emb.device) if attention_mask is None else attention_mask
    m = mask.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)  # (b, n, 1)
    return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b, d)


class BundleRouter:
    """A bundle's routing: prompts (OrchMoE) or tasks (Poly/MHR) -> LoRA names.

    Attributes:
        manifest: the bundle's `BundleManifest`.
        task_router: OrchMoE's Task Router (eval mode, fp32), else None.
    """

    def __init__(self, manifest: BundleManifest, task_router: TaskRouter | None) -> None:
        self.manifest, self.task_router = manifest, task_router

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> BundleRouter:
        """Load a bundle's router (``manifest.json``, ``router.json``, ``router.safetensors``).

        Raises:
            BundleError: an incomplete bundle, or router files that do not fit its manifest.
        """
        manifest = BundleManifest.read(folder)
        try:
            desc = json.loads((Path(folder) / ROUTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"{folder}/{ROUTER_CONFIG} cannot be read: {e}") from None
        if desc.get("kind") != "orchmoe-task-router":
            return cls(manifest, None)
        router = TaskRouter(
            desc["d_model"],
            desc["n_abstract_tasks"],
            desc["temperature"],
            desc["hidden"],
            desc["hard"],
            desc["prompt_norm"],
        )
        try:
            router.load_state_dict(load_file(str(Path(folder) / desc["weights"])))
        except (OSError, RuntimeError, KeyError) as e:
            raise BundleError(f"the Task Router weights in {folder} do not fit {ROUTER_CONFIG}: {e}") from None
        return cls(manifest, router.float().to(device).eval())

    def probabilities(
        self, embeddings: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pi(x) of a batch of prompts, (b, K).

        Args:
            embeddings: the base model's input embeddings (``base.get_input_embeddings()``), (V, d).
            input_ids: (b, n) prompt tokens (padded either side).
            attention_mask: (b, n), 1 on the prompt's tokens.
        Raises:
            BundleError: the bundle does not route by the prompt.
        """
        if self.task_router is None:
            raise BundleError(f"a {self.manifest.method} bundle does not route by the prompt")
        with torch.no_grad():
            return self.task_router(prompt_summary(embeddings, input_ids, attention_mask))  # (b, K)

    def route(
        self,
        embeddings: nn.Module | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        tasks: list[int | str] | None = None,
    ) -> list[str]:
        """The LoRA name of each request.

        Args:
            embeddings, input_ids, attention_mask: OrchMoE: the prompts, as `probabilities`.
            tasks: Poly/MHR: each request's task (id, -1, or name; an unknown name is an unseen task).
        Returns:
            One LoRA name per request (``lora`` for every request of a LoRA bundle).
        """
        by = self.manifest.data["route"]["by"]
        if by == "prompt":
            if embeddings is None or input_ids is None:
                raise BundleError("an OrchMoE bundle routes by the prompt: pass the embeddings and input_ids")
            ks = self.probabilities(embeddings, input_ids, attention_mask).argmax(-1).tolist()
            return [self.manifest.lora_for(abstract_task=k) for k in ks]
        if by == "task":
            if tasks is None:
                raise BundleError(f"a {self.manifest.method} bundle routes by task: pass tasks=[...]")
            return [self.manifest.lora_for(task=t) for t in tasks]
        n = len(tasks) if tasks is not None else (input_ids.shape[0] if input_ids is not None else 1)
        return [self.manifest.lora_for()] * n
