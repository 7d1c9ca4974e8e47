"""What the routers learned, as arrays: allocation matrices, the Task Router's assignment of tasks to
abstract tasks, per-task skill profiles, their agreement with the task categories and their clusters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from orchmoe.core.diagnostics import nmi_chance, normalized_mutual_info, purity
from orchmoe.tuner.model import RoutedModel

__all__ = [
    "AnalysisError",
    "TaskAssignment",
    "allocation_kind",
    "allocation_matrices",
    "prompt_task_probabilities",
    "abstract_task_assignment",
    "task_skill_profile",
    "category_agreement",
    "cluster_tasks",
    "linkage_matrix",
]


class AnalysisError(ValueError):
    """An analysis that does not apply to this adapter, or a run folder it cannot read."""


# =============================================================================================
# Allocation matrices


def allocation_kind(model: RoutedModel) -> str:
    """ "prompt" (OrchMoE: rows are abstract tasks) or "task_ids" (Poly/MHR: rows are training tasks)."""
    cfg = model.adapter_config
    if model.router is None or model.router.allocation_matrices() is None:
        raise AnalysisError(
            f"a {cfg.method} adapter has no task-skill allocation matrix: only OrchMoE (K x S per layer) and "
            "Poly/MHR (T x S per layer) learn one; LoRA has a single expert and MoLoRA/MoDE route every token"
        )
    return cfg.routing


@torch.no_grad()
def allocation_matrices(model: RoutedModel) -> dict[str, np.ndarray]:
    """Evaluation-mode task-skill allocation of every adapted layer, in model order.

    OrchMoE: the Skill Router's row-normalised sigmoid(W_skill), (K, S). Poly: sigmoid(Z)
    row-normalised, (T, S); MHR's (T, h, S) is averaged over its h blocks (each block's row
    sums to one, so the mean does too). Evaluation mode because the Gumbel noise of training
    would make the picture random.
    """
    allocation_kind(model)
    stacked = model.router.allocation_matrices().detach().float().cpu().numpy()  # (L, rows, S)
    return {path: stacked[i] for i, path in enumerate(model.routed_layers)}


# =============================================================================================
# Abstract-task assignment (OrchMoE's Task Router)


class TaskAssignment(NamedTuple):
    """Result of :func:`abstract_task_assignment`; unpacks as ``tasks, mean_pi, assignment``."""

    tasks: list[str]
    mean_pi: np.ndarray  # (T, K): pi(x) averaged over each task's prompts
    assignment: np.ndarray  # (T,) int: argmax of each row of mean_pi


def _as_long(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).long()


def _prompt_batches(prompts: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One task's prompts as (input_ids, attention_mask) batches of at most `batch_size` rows.

    Accepts a list of (ids, mask) pairs (1-D, any lengths; mask may be None), a pre-padded
    (ids (n, L), mask (n, L)) pair, or a dict with "input_ids"/"attention_mask" (what
    ``orchmoe.data.pad_batch`` returns).
    """
    if isinstance(prompts, Mapping):
        prompts = (prompts["input_ids"], prompts.get("attention_mask"))
    if (
        isinstance(prompts, (tuple, list))
        and len(prompts) == 2
        and isinstance(prompts[0], (torch.Tensor, np.ndarray))
        and prompts[0].ndim == 2
    ):
        ids = _as_long(prompts[0])
        mask = torch.ones_like(ids) if prompts[1] is None else _as_long(prompts[1])
        if mask.shape != ids.shape:
            raise AnalysisError(
                f"attention_mask of shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
            )
        return [(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
    pairs = []
    for item in prompts:
        if isinstance(item, Mapping):
            item = (item["input_ids"], item.get("attention_mask"))
        ids, mask = (item, None) if np.ndim(item[0]) == 0 else (item[0], item[1])
        ids = _as_long(ids).reshape(-1)
        mask = torch.ones_like(ids) if mask is None else _as_long(mask).reshape(-1)
        if mask.shape != ids.shape:
            raise AnalysisError(f"a prompt's attention_mask has {mask.numel()} entries for {ids.numel()} tokens")
        pairs.append((ids, mask))
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        length = max(p[0].numel() for p in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)  # pad id is irrelevant: masked out of the mean
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for j, (x, m) in enumerate(chunk):
            ids[j, : x.numel()], mask[j, : m.numel()] = x, m
        batches.append((ids, mask))
    return batches


@torch.no_grad()
def prompt_task_probabilities(
    model: RoutedModel, prompts_by_task: Mapping[str, Any], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """pi(x) of every prompt, (n_prompts, K) per task; eval mode, no grad, batched.

    Only the input embeddings and the Task Router run (no transformer forward), so this is
    cheap even for thousands of prompts.
    """
    if model.task_router is None:
        raise AnalysisError(
            f"a {model.adapter_config.method} adapter has no Task Router: abstract-task assignment "
            "is an OrchMoE analysis (Poly/MHR route by the true task id)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        out = {}
        for task, prompts in prompts_by_task.items():
            rows = [
                model.task_probabilities(ids.to(device), mask.to(device)).float().cpu()
                for ids, mask in _prompt_batches(prompts, batch_size)
            ]
            if not rows:
                raise AnalysisError(f"task {task!r} has no prompts")
            out[task] = torch.cat(rows).double().numpy()
        return out
    finally:
        model.train(was_training)


def abstract_task_assignment(
    model: RoutedModel, prompts_by_task: Mapping[str, Any], batch_size: int = 32
) -> TaskAssignment:
    """Mean pi over each training task's prompts and the abstract task it mostly goes to.

    ``prompts_by_task``: task -> list of (input_ids, attention_mask) pairs, or one padded
    (input_ids, attention_mask) pair of (n, L) tensors. Tasks keep the mapping's order.
    """
    pis = prompt_task_probabilities(model, prompts_by_task, batch_size)
    tasks = list(pis)
    if not tasks:
        raise AnalysisError("prompts_by_task is empty")
    mean_pi = np.stack([pis[t].mean(0) for t in tasks])  # (T, K)
    return TaskAssignment(tasks, mean_pi, mean_pi.argmax(1))


def task_skill_profile(
    model_or_matrices: RoutedModel | Mapping[str, np.ndarray], mean_pi: np.ndarray | None = None
) -> np.ndarray:
    """Per-task skill allocation averaged over layers, (T, S): the rows Figure 3 clusters.

    OrchMoE: ``mean_pi (T, K) @ allocation (K, S)`` per layer, then the layer mean. Poly/MHR:
    the (T, S) allocations themselves (``mean_pi`` None, or a (T', T) task mix). Rows sum to 1.
    """
    matrices = (
        allocation_matrices(model_or_matrices) if not isinstance(model_or_matrices, Mapping) else model_or_matrices
    )
    if not matrices:
        raise AnalysisError("no allocation matrices to build a profile from")
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in matrices.values()])  # (L, R, S)
    if mean_pi is None:
        return stack.mean(0)
    mean_pi = np.asarray(mean_pi, dtype=np.float64)
    if mean_pi.ndim != 2 or mean_pi.shape[1] != stack.shape[1]:
        raise AnalysisError(
            f"mean_pi of shape {mean_pi.shape} does not mix allocation rows: the matrices have "
            f"{stack.shape[1]} rows (K abstract tasks, or T tasks for Poly)"
        )
    return np.einsum("tk,lks->ts", mean_pi, stack) / stack.shape[0]  # mean_l (T,K)@(K,S) -> (T,S)


# =============================================================================================
# Agreement with SuperNI categories


def category_agreement(
    assignment: Sequence[int] | Mapping[str, int],
    categories: Sequence[str] | Mapping[str, str],
    *,
    n_permutations: int = 200,
) -> dict[str, float | int]:
    """How well the learned grouping (abstract task or cluster per task) matches SuperNI categories.

    Both may be aligned sequences, or mappings keyed by task (aligned on ``assignment``'s keys).
    ``purity``: each group's majority category; ``inverse_purity``: each category's majority
    group (1 when no category is split across groups). Note purity is trivially 1 with one
    group per task, which is why NMI is the headline number; ``nmi_chance`` is its
    permutation baseline (:func:`nmi_chance`, seeded; ``n_permutations=0`` skips it).
    """
    if isinstance(assignment, Mapping):
        tasks = list(assignment)
        if not isinstance(categories, Mapping):
            raise AnalysisError("assignment is keyed by task, so categories must be too")
        missing = [t for t in tasks if t not in categories]
        if missing:
            raise AnalysisError(f"no category for task(s) {missing[:5]}")
        groups, cats = [assignment[t] for t in tasks], [categories[t] for t in tasks]
    else:
        groups = [int(g) for g in assignment]
        cats = list(categories.values()) if isinstance(categories, Mapping) else list(categories)
    if len(groups) != len(cats):
        raise AnalysisError(f"{len(groups)} assignments for {len(cats)} categories")
    out = {
        "nmi": normalized_mutual_info(groups, cats),
        "purity": purity(groups, cats),
        "inverse_purity": purity(cats, groups),
        "n_tasks": len(groups),
        "n_groups": len(set(groups)),
        "n_categories": len(set(cats)),
    }
    if n_permutations > 0:
        out["nmi_chance"] = nmi_chance(groups, cats, n_permutations)
    return out


# =============================================================================================
# Hierarchical clustering of task rows


def linkage_matrix(profile: np.ndarray, method: str, metric: str) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    x = np.asarray(profile, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise AnalysisError(f"clustering needs a (T >= 2, S) matrix of task rows, got shape {x.shape}")
    if method in ("ward", "centroid", "median"):  # defined for euclidean distances only
        return linkage(x, method=method, metric="euclidean")
    d = np.nan_to_num(pdist(x, metric=metric), nan=1.0)  # a zero row has no cosine: call it unrelated
    return linkage(np.clip(d, 0.0, None), method=method)


def cluster_tasks(profile: np.ndarray, n_clusters: int, method: str = "average", metric: str = "cosine") -> np.ndarray:
    """Flat clusters (labels 0..n-1) from cutting the task dendrogram into at most `n_clusters`."""
    from scipy.cluster.hierarchy import fcluster

    return fcluster(linkage_matrix(profile, method, metric), t=max(int(n_clusters), 1), criterion="maxclust") - 1
