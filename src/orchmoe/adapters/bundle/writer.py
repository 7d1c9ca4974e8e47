"""Writing a routed adapter as a multi-LoRA bundle of standard PEFT LoRAs (`write_bundle`; one routing:
`orchmoe.adapters.export.export_peft_lora`) that an existing multi-LoRA server (vLLM, SGLang, LoRAX) serves by name.

With parameter mixing a fixed routing folds every layer into one rank-r LoRA (`RoutedModel.export_peft_lora`).
The bundle has one LoRA per routing a request can take: per Poly/MHR task plus the unseen-task routing
(-1, the mean allocation), per OrchMoE abstract task actually used (the argmax of pi over the prompts given:
a run's training and evaluation prompts, or a file), or LoRA's single one. Per-token routing (MoLoRA, MoDE)
mixes experts inside every layer for every token: no LoRA per request reproduces it, so it is refused.

The model is used only through `RoutedModel`'s public interface (``adapter_config``, ``fixed_weights``,
``task_probabilities``, ``export_peft_lora``, ``generate``), plus ``task_router`` for OrchMoE's router file.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchmoe.adapters.bundle.check import RoutedPrompt, check_bundle
from orchmoe.adapters.bundle.names import BUNDLE_FORMAT, BUNDLE_VERSION, LORAS, MANIFEST, README, BundleError, lora_name
from orchmoe.adapters.bundle.readme import bundle_readme, serve_commands
from orchmoe.adapters.bundle.router import write_router
from orchmoe.adapters.export import check_destination, export_peft_lora, refuse_token_routing
from orchmoe.data import pad_batch
from orchmoe.utils.fileio import atomic_folder, atomic_write_text
from orchmoe.version import __version__

__all__ = ["plan_bundle", "write_bundle"]


@dataclass
class Plan:
    """What a bundle holds: its LoRAs (name -> routing and statistics), the routing -> LoRA map of the manifest,
    each prompt's LoRA, and how peaked pi was over the prompts (OrchMoE)."""

    loras: dict[str, dict[str, Any]]
    route: dict[str, Any]
    rows: list[str]
    pi: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def task_probabilities(model, prompts: Sequence[RoutedPrompt], batch_size: int = 64) -> torch.Tensor:
    """pi(x) of every prompt, (n, K), computed as generation routes (evaluation mode, the attended tokens)."""
    pad = 0
    out = []
    was = model.training
    model.eval()
    try:
        for s in range(0, len(prompts), batch_size):
            batch = pad_batch(
                [{"input_ids": list(p.ids)} for p in prompts[s : s + batch_size]], pad, "left", decoder_only=True
            )
            ids, mask = batch["input_ids"].to(_device(model)), batch["attention_mask"].to(_device(model))
            with torch.no_grad():
                out.append(model.task_probabilities(ids, mask).float().cpu())  # (b, K)
    finally:
        model.train(was)
    return torch.cat(out)


def _allocation(model, k: int) -> torch.Tensor:
    """Every layer's evaluation-mode allocation of abstract task k, flattened."""
    return torch.cat([w.flatten().float().cpu() for w in model.fixed_weights(abstract_task=k).values()])


def _plan_prompt(model, prompts: Sequence[RoutedPrompt], all_abstract_tasks: bool) -> Plan:
    """OrchMoE: one LoRA per abstract task that is the argmax of pi for some prompt (or every one)."""
    K = model.adapter_config.n_abstract_tasks
    if not prompts and not all_abstract_tasks:
        raise BundleError(
            "an OrchMoE bundle exports the abstract tasks the prompts use: give prompts (a run folder's, or a "
            "file) or ask for every abstract task"
        )
    pi = task_probabilities(model, prompts) if prompts else torch.zeros(0, K)
    ks = pi.argmax(-1).tolist()
    used = list(range(K)) if all_abstract_tasks else sorted(set(ks))
    allocs = {k: _allocation(model, k) for k in range(K)}
    nearest = {
        k: min(used, key=lambda u: (float((allocs[k] - allocs[u]).abs().mean()), u)) if k not in used else k
        for k in range(K)
    }
    loras = {}
    for k in used:
        mine = [p for p, kk in zip(prompts, ks) if kk == k]
        loras[lora_name(abstract_task=k)] = {
            "routing": {"abstract_task": k},
            "prompts": len(mine),
            "tasks": dict(Counter(p.task for p in mine if p.task is not None).most_common()),
        }
    route = {
        "by": "prompt",
        "rule": "pi(x) from the prompt (router.json); the LoRA is abstract_task_to_lora[argmax pi]. An abstract "
        "task no prompt used has no LoRA of its own: it maps to the exported abstract task whose allocation is "
        "nearest (mean absolute difference over every layer)",
        "n_abstract_tasks": K,
        "abstract_task_to_lora": {str(k): lora_name(abstract_task=nearest[k]) for k in range(K)},
    }
    top = pi.max(-1).values if len(pi) else torch.zeros(0)
    stats = {
        "hard": bool(model.adapter_config.hard_routing),
        "mean_max_pi": float(top.mean()) if len(top) else None,
        "share_max_pi_over_0.99": float((top > 0.99).float().mean()) if len(top) else None,
    }
    return Plan(loras, route, [lora_name(abstract_task=k) for k in ks], stats)


def _plan_tasks(model, prompts: Sequence[RoutedPrompt]) -> Plan:
    """Poly/MHR: one LoRA per training task id, plus the unseen-task routing (-1)."""
    T = model.adapter_config.n_tasks
    task_to_id = dict((getattr(model, "adapter_metadata", None) or {}).get("task_to_id") or {})
    id_to_task = {i: t for t, i in task_to_id.items()}
    loras = {lora_name(task_id=t): {"routing": {"task_id": t}, "task": id_to_task.get(t)} for t in range(T)}
    loras[lora_name(task_id=-1)] = {"routing": {"task_id": -1}, "task": "(any unseen task: the mean allocation)"}
    route = {
        "by": "task",
        "rule": "a training task's id (or name, task_to_id) picks task-<id>; any other task, or id -1, task-unseen",
        "task_to_id": task_to_id,
    }
    rows = [lora_name(task_id=-1 if p.task_id is None else p.task_id) for p in prompts]
    return Plan(loras, route, rows)


def plan_bundle(model, prompts: Sequence[RoutedPrompt], all_abstract_tasks: bool = False) -> Plan:
    """Which LoRAs the bundle of `model` holds, and each prompt's LoRA."""
    cfg = model.adapter_config
    refuse_token_routing(cfg.method, cfg.routing)
    if cfg.routing == "prompt":
        return _plan_prompt(model, prompts, all_abstract_tasks)
    if cfg.routing == "task_ids":
        return _plan_tasks(model, prompts)
    return Plan(
        {lora_name(): {"routing": {}}},
        {"by": "none", "rule": "one LoRA for every request"},
        [lora_name()] * len(prompts),
    )


def _exactness(model, plan: Plan) -> tuple[bool, str]:
    cfg = model.adapter_config
    if cfg.routing == "none":
        return True, "LoRA has one routing: the LoRA is the adapter"
    if cfg.routing == "task_ids":
        return True, "each task's routing is fixed: task-<id> is the routed adapter of that task (task-unseen of id -1)"
    if cfg.hard_routing:
        return True, "pi is one-hot (hard routing): a prompt's LoRA is the routed adapter for that prompt"
    return False, (
        "pi is soft: the routed adapter mixes the abstract tasks' allocations by pi, the bundle serves the LoRA of "
        "argmax pi alone; see agreement for how often that changes a greedy answer"
    )


def _lora_shape(folder: Path) -> dict[str, Any]:
    """Rank, alpha and the target module names (leaves) of an exported LoRA, from its adapter_config.json."""
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    leaves = sorted({m.rsplit(".", 1)[-1] for m in cfg["target_modules"]})
    return {"rank": cfg["r"], "lora_alpha": cfg["lora_alpha"], "target_modules": leaves,
            "base_model_name_or_path": cfg["base_model_name_or_path"]}  # fmt: skip


def _manifest(model, plan: Plan, shape: dict, prompt_source: str | None, prompts, agreement, dest: Path) -> dict:
    cfg = model.adapter_config
    exact, why = _exactness(model, plan)
    meta = getattr(model, "adapter_metadata", None) or {}
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "orchmoe_version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": cfg.method,
        "base_model": {"name": model.base_model_name, "source": shape["base_model_name_or_path"]},
        **{k: shape[k] for k in ("rank", "lora_alpha", "target_modules")},
        "loras": {name: {"path": f"{LORAS}/{name}", **entry} for name, entry in plan.loras.items()},
        "route": plan.route,
        "router": {"config": "router.json", "weights": "router.safetensors" if cfg.routing == "prompt" else None},
        "prompts": {
            "source": prompt_source,
            "count": len(prompts),
            "by_split": dict(Counter(p.split for p in prompts if p.split)),
        },
        "prompt_format": meta.get("prompt"),
        "pi": plan.pi,
        "exact": exact,
        "exactness": why,
        "agreement": agreement,
    }
    manifest["serve"] = serve_commands(manifest, dest)
    return manifest


def write_bundle(
    model,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    prompts: Sequence[RoutedPrompt] = (),
    prompt_source: str | None = None,
    all_abstract_tasks: bool = False,
    fresh_base: Callable[[], torch.nn.Module] | None = None,
    check: int = 32,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    overwrite: bool = False,
    protect: Iterable = (),
) -> dict[str, Any]:
    """Write the multi-LoRA bundle of `model` into `out` (whole or not at all) and return its manifest.

    Args:
        model: a `RoutedModel` (LoRA, Poly, MHR or OrchMoE).
        out: the bundle folder (refused when non-empty, unless `overwrite` and it holds an earlier export).
        tokenizer: the base model's (eos and pad of the check).
        prompts: prompts the routing is read from (OrchMoE: the abstract tasks they use) and the check runs on.
        prompt_source: where the prompts came from, recorded in the manifest.
        all_abstract_tasks: OrchMoE: one LoRA per abstract task, used or not.
        fresh_base: returns a fresh base model for the check (PEFT's model); None skips the check.
        check: prompts compared at most (0: no check).
        max_new_tokens, batch_size: the check's greedy decoding.
        overwrite: replace an earlier export in `out`.
        protect: folders `out` may not touch (the adapter exported).
    Returns:
        The manifest (also ``out/manifest.json``).
    Raises:
        BundleError: per-token routing, an unsafe destination, or OrchMoE without prompts.
    """
    cfg = model.adapter_config
    refuse_token_routing(cfg.method, cfg.routing)
    dest = check_destination(out, overwrite=overwrite, protect=protect)
    prompts = list(prompts)
    plan = plan_bundle(model, prompts, all_abstract_tasks)
    with atomic_folder(dest) as stage:
        for name, entry in plan.loras.items():
            export_peft_lora(model, stage / LORAS / name, **entry["routing"])
        write_router(model, stage)
        agreement = None
        if check > 0 and prompts and fresh_base is not None:
            if tokenizer is None:
                raise BundleError("the check decodes greedily: pass the tokenizer")
            base = fresh_base().to(_device(model))
            loras = {name: stage / LORAS / name for name in plan.loras}
            agreement = check_bundle(model, base, loras, prompts, plan.rows, tokenizer=tokenizer, limit=check,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)  # fmt: skip
            del base
        shape = _lora_shape(stage / LORAS / next(iter(plan.loras)))
        manifest = _manifest(model, plan, shape, prompt_source, prompts, agreement, dest)
        atomic_write_text(stage / README, bundle_readme(manifest, dest))
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: the bundle is complete
    return manifest
