"""The paper's analyses of a trained adapter: what the routers learned.

OrchMoE's claims rest on three pictures, all reproduced here from a saved run:

* the per-layer task-skill allocation matrices (Figure 3: which skills each abstract
  task, or for Poly/MHR each training task, uses): :func:`allocation_matrices`,
  :func:`plot_allocation_heatmaps`;
* which abstract task the Task Router sends each training task to, and whether those
  abstract tasks line up with the SuperNI categories: :func:`abstract_task_assignment`,
  :func:`normalized_mutual_info`, :func:`category_agreement`;
* tasks clustered by the skills they end up using (dendrogram over the rows of the
  per-task skill profile): :func:`task_skill_profile`, :func:`plot_dendrogram`,
  :func:`plot_task_heatmap`;

plus the result figures/tables: score against trainable parameters (Figure 2,
:func:`plot_score_vs_params`) and the ablation over K (:func:`redundancy_table`).
:func:`analyze_run` runs everything on a training run folder (``orchmoe analyze RUN``).

Plots use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so they do
not touch the global backend of a notebook or GUI session that imports this module.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .diagnostics import UNIFORM_SPREAD, nmi_chance, normalized_mutual_info, purity  # noqa: F401  (re-exported)
from .model import ADAPTER_CONFIG, AdapterMismatchError, RoutedModel, read_adapter_config

__all__ = [
    "AnalysisError",
    "TaskAssignment",
    "RunInfo",
    "allocation_matrices",
    "abstract_task_assignment",
    "task_skill_profile",
    "cluster_tasks",
    "normalized_mutual_info",
    "purity",
    "category_agreement",
    "nmi_chance",
    "plot_allocation_heatmaps",
    "plot_task_heatmap",
    "plot_dendrogram",
    "plot_score_vs_params",
    "redundancy_table",
    "read_run",
    "load_run_model",
    "build_task_prompts",
    "analyze_model",
    "analyze_run",
]

PathLike = str | os.PathLike


class AnalysisError(ValueError):
    """An analysis that does not apply to this adapter, or a run folder it cannot read."""


# =============================================================================================
# Allocation matrices


def _allocation_kind(model: RoutedModel) -> str:
    """"prompt" (OrchMoE: rows are abstract tasks) or "task_ids" (Poly/MHR: rows are training tasks)."""
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
    _allocation_kind(model)
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
    if (isinstance(prompts, (tuple, list)) and len(prompts) == 2 and isinstance(prompts[0], (torch.Tensor, np.ndarray))
            and prompts[0].ndim == 2):
        ids = _as_long(prompts[0])
        mask = torch.ones_like(ids) if prompts[1] is None else _as_long(prompts[1])
        if mask.shape != ids.shape:
            raise AnalysisError(f"attention_mask of shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        return [(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
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
        chunk = pairs[i:i + batch_size]
        length = max(p[0].numel() for p in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)  # pad id is irrelevant: masked out of the mean
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for j, (x, m) in enumerate(chunk):
            ids[j, :x.numel()], mask[j, :m.numel()] = x, m
        batches.append((ids, mask))
    return batches


@torch.no_grad()
def prompt_task_probabilities(model: RoutedModel, prompts_by_task: Mapping[str, Any],
                              batch_size: int = 32) -> dict[str, np.ndarray]:
    """pi(x) of every prompt, (n_prompts, K) per task; eval mode, no grad, batched.

    Only the input embeddings and the Task Router run (no transformer forward), so this is
    cheap even for thousands of prompts.
    """
    if model.task_router is None:
        raise AnalysisError(f"a {model.adapter_config.method} adapter has no Task Router: abstract-task assignment "
                            "is an OrchMoE analysis (Poly/MHR route by the true task id)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.base_model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        out = {}
        for task, prompts in prompts_by_task.items():
            rows = [model.task_probabilities(ids.to(device), mask.to(device)).float().cpu()
                    for ids, mask in _prompt_batches(prompts, batch_size)]
            if not rows:
                raise AnalysisError(f"task {task!r} has no prompts")
            out[task] = torch.cat(rows).double().numpy()
        return out
    finally:
        model.train(was_training)


def abstract_task_assignment(model: RoutedModel, prompts_by_task: Mapping[str, Any],
                             batch_size: int = 32) -> TaskAssignment:
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


def task_skill_profile(model_or_matrices: RoutedModel | Mapping[str, np.ndarray],
                       mean_pi: np.ndarray | None = None) -> np.ndarray:
    """Per-task skill allocation averaged over layers, (T, S): the rows Figure 3 clusters.

    OrchMoE: ``mean_pi (T, K) @ allocation (K, S)`` per layer, then the layer mean. Poly/MHR:
    the (T, S) allocations themselves (``mean_pi`` None, or a (T', T) task mix). Rows sum to 1.
    """
    matrices = allocation_matrices(model_or_matrices) if isinstance(model_or_matrices, RoutedModel) else model_or_matrices
    if not matrices:
        raise AnalysisError("no allocation matrices to build a profile from")
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in matrices.values()])  # (L, R, S)
    if mean_pi is None:
        return stack.mean(0)
    mean_pi = np.asarray(mean_pi, dtype=np.float64)
    if mean_pi.ndim != 2 or mean_pi.shape[1] != stack.shape[1]:
        raise AnalysisError(f"mean_pi of shape {mean_pi.shape} does not mix allocation rows: the matrices have "
                            f"{stack.shape[1]} rows (K abstract tasks, or T tasks for Poly)")
    return np.einsum("tk,lks->ts", mean_pi, stack) / stack.shape[0]  # mean_l (T,K)@(K,S) -> (T,S)


# =============================================================================================
# Agreement with SuperNI categories


def category_agreement(assignment: Sequence[int] | Mapping[str, int],
                       categories: Sequence[str] | Mapping[str, str], *, n_permutations: int = 200) -> dict[str, float | int]:
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


def _linkage(profile: np.ndarray, method: str, metric: str) -> np.ndarray:
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

    return fcluster(_linkage(profile, method, metric), t=max(int(n_clusters), 1), criterion="maxclust") - 1


# =============================================================================================
# Plots


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the analysis/test extras
        raise ImportError("plots need matplotlib: pip install 'orchmoe[analysis]'") from e
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _short_layer_name(path: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'L3 self_attn.q_proj'; T5 gets an enc/dec prefix."""
    parts = path.split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numbers:
        return path
    side = "enc " if "encoder" in parts else "dec " if "decoder" in parts else ""
    return f"{side}L{parts[numbers[0]]} " + ".".join(parts[numbers[-1] + 1:])


def _category_colors(categories: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = sorted(set(categories))
    palette = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors) + list(colormaps["tab20b"].colors)
    return {c: palette[i % len(palette)] for i, c in enumerate(names)}


def _categories_list(task_names: Sequence[str], categories: Sequence[str] | Mapping[str, str] | None) -> list[str]:
    if categories is None:
        return ["Unknown"] * len(task_names)
    if isinstance(categories, Mapping):
        return [str(categories.get(t, "Unknown")) for t in task_names]
    cats = [str(c) for c in categories]
    if len(cats) != len(task_names):
        raise AnalysisError(f"{len(cats)} categories for {len(task_names)} tasks")
    return cats


def _category_legend(fig, colors: Mapping[str, Any], width: float, font: int = 8) -> None:
    """Category legend under the axes, in as many columns as fit the figure width."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=name) for name, c in colors.items()]
    col_w = 0.075 * max(len(n) for n in colors) * font / 8 + 0.5  # inches per legend column
    ncols = max(1, min(len(handles), int(width // col_w), 6))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=font,
               title="category", title_fontsize=font, frameon=False)


def plot_allocation_heatmaps(matrices: Mapping[str, np.ndarray], path: PathLike, *, max_layers: int = 12,
                             row_label: str = "abstract task", title: str | None = None) -> Path:
    """Grid of per-layer allocation heatmaps (rows: abstract tasks or tasks, columns: skills).

    With more than ``max_layers`` layers an evenly spaced subset is drawn (first and last
    included), so the grid stays readable for a 30-layer model. One shared colour scale.
    """
    if not matrices:
        raise AnalysisError("no allocation matrices to plot")
    names = list(matrices)
    if len(names) > max_layers:
        idx = sorted(set(np.linspace(0, len(names) - 1, max_layers).round().astype(int).tolist()))
        names = [names[i] for i in idx]
    mats = [np.asarray(matrices[n], dtype=np.float64) for n in names]
    rows_n, skills = mats[0].shape
    nrows = math.ceil(len(mats) / 6)
    ncols = math.ceil(len(mats) / nrows)  # balanced rows: 8 layers -> 2 x 4, not 6 + 2
    cell_h = min(max(0.28 * rows_n, 1.6), 7.0)
    cell_w = min(max(0.45 * skills, 1.6), 5.0)
    fig = _figure(ncols * cell_w + 1.2, nrows * (cell_h + 0.6) + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    vmax = max(float(m.max()) for m in mats) or 1.0
    annotate = rows_n * skills <= 48
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= len(mats):
            ax.set_axis_off()
            continue
        m = mats[i]
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(_short_layer_name(names[i]), fontsize=8)
        ax.set_xticks(range(skills), [f"s{s}" for s in range(skills)] if skills <= 16 else None, fontsize=7)
        if skills > 16:
            ax.set_xticks([])
        if rows_n <= 40:
            ax.set_yticks(range(rows_n), [str(r) for r in range(rows_n)], fontsize=7)
        else:
            ax.set_yticks([])
        if i % ncols == 0:
            ax.set_ylabel(row_label, fontsize=8)
        if i // ncols == nrows - 1 or i + ncols >= len(mats):
            ax.set_xlabel("skill", fontsize=8)
        if annotate:
            for (r, s), v in np.ndenumerate(m):
                ax.text(s, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=axes, shrink=min(0.8, 4.0 / (nrows * (cell_h + 0.6))) if nrows * cell_h > 5 else 0.8,
                 aspect=25, label="allocation weight (row sums to 1)")
    shown = f" ({len(mats)} of {len(matrices)} layers)" if len(mats) < len(matrices) else ""
    fig.suptitle((title or "Task-skill allocation per layer") + shown, fontsize=10)
    return _save(fig, path)


def _leaf_order(profile: np.ndarray, method: str = "average", metric: str = "cosine") -> list[int]:
    from scipy.cluster.hierarchy import leaves_list

    if profile.shape[0] < 3:
        return list(range(profile.shape[0]))
    return leaves_list(_linkage(profile, method, metric)).tolist()[::-1]  # top-down, as plot_dendrogram draws


def plot_task_heatmap(profile: np.ndarray, task_names: Sequence[str],
                      categories: Sequence[str] | Mapping[str, str] | None, path: PathLike, *,
                      col_label: str = "skill", order: str = "cluster", center: float | None = None,
                      title: str | None = None) -> Path:
    """Tasks x skills (or tasks x abstract tasks) heatmap, task labels coloured by category.

    ``order``: "cluster" (dendrogram leaf order, so tasks sharing skills sit together, as in
    Figure 3), "category" (grouped by SuperNI category) or "given". ``center``: draw with a
    diverging map white at this value (e.g. 1/S, the uniform share, so over- and under-used
    skills stand out when a profile is close to uniform); None: viridis from 0.
    """
    profile = np.asarray(profile, dtype=np.float64)
    task_names = [str(t) for t in task_names]
    if profile.ndim != 2 or profile.shape[0] != len(task_names):
        raise AnalysisError(f"profile of shape {profile.shape} does not have one row per task ({len(task_names)})")
    cats = _categories_list(task_names, categories)
    if order == "cluster":
        idx = _leaf_order(profile)
    elif order == "category":
        idx = sorted(range(len(task_names)), key=lambda i: (cats[i], task_names[i]))
    elif order == "given":
        idx = list(range(len(task_names)))
    else:
        raise ValueError(f"order must be 'cluster', 'category' or 'given', got {order!r}")
    T, C = profile.shape
    colors = _category_colors(cats)
    font = 8 if T <= 40 else 6 if T <= 120 else 4
    label_w = min(0.06 * max(len(t) for t in task_names) * font / 8 + 0.3, 5.0)
    width = label_w + min(max(0.45 * C, 2.5), 10.0) + 1.5
    fig = _figure(width, max(0.16 * T * font / 8 + 1.6 + 0.2 * math.ceil(len(colors) / 3), 3.0))
    ax = fig.subplots()
    m = profile[idx]
    vmax = float(m.max()) or 1.0
    if center is not None:
        from matplotlib.colors import TwoSlopeNorm

        lo = min(float(m.min()), center - 1e-9)
        norm = TwoSlopeNorm(vcenter=center, vmin=lo, vmax=max(vmax, center + 1e-9))
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    else:
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(T), [task_names[i] for i in idx], fontsize=font)
    for tick, i in zip(ax.get_yticklabels(), idx):
        tick.set_color(colors[cats[i]])
    prefix = "s" if col_label == "skill" else "k"
    ax.set_xticks(range(C), [f"{prefix}{c}" for c in range(C)] if C <= 32 else None, fontsize=7)
    ax.set_xlabel(col_label)
    if T * C <= 200:
        for (r, c), v in np.ndenumerate(m):
            dark = abs(im.norm(v) - 0.5) > 0.3 if center is not None else v < 0.6 * vmax
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, shrink=min(0.9, 5.0 / (T * 0.16 * font / 8)) if T > 40 else 0.9, aspect=25,
                 label="mean allocation" if col_label == "skill" else "mean π(x)")
    _category_legend(fig, colors, width)
    ordering = "dendrogram order" if order == "cluster" else f"{order} order"
    if center is not None:
        ordering += f"; white = {center:.3g}"
    ax.set_title(title or f"Per-task {col_label} allocation ({ordering})", fontsize=10)
    return _save(fig, path)


def plot_dendrogram(profile: np.ndarray, task_names: Sequence[str],
                    categories: Sequence[str] | Mapping[str, str] | None, path: PathLike, *,
                    method: str = "average", metric: str = "cosine", title: str | None = None) -> list[str]:
    """Hierarchical clustering of task rows; leaves 'task [category]' coloured by category.

    ``method="average", metric="cosine"`` compares the shape of the skill mix (tasks grouped
    if they share skills); ``method="ward"`` uses euclidean distances. Returns the task names
    in leaf order (top to bottom in the figure).
    """
    from scipy.cluster.hierarchy import dendrogram

    profile = np.asarray(profile, dtype=np.float64)
    task_names = [str(t) for t in task_names]
    if profile.ndim != 2 or profile.shape[0] != len(task_names):
        raise AnalysisError(f"profile of shape {profile.shape} does not have one row per task ({len(task_names)})")
    cats = _categories_list(task_names, categories)
    Z = _linkage(profile, method, metric)
    T = len(task_names)
    colors = _category_colors(cats)
    font = 8 if T <= 40 else 6 if T <= 120 else 4
    labels = [f"{t} [{c}]" for t, c in zip(task_names, cats)]
    label_w = min(0.06 * max(len(s) for s in labels) * font / 8 + 0.3, 7.0)
    width = label_w + 4.5
    fig = _figure(width, max(0.16 * T * font / 8 + 1.6 + 0.2 * math.ceil(len(colors) / 3), 3.0))
    ax = fig.subplots()
    # Links in one neutral colour: colour carries the category, not scipy's cluster palette.
    d = dendrogram(Z, labels=labels, orientation="left", ax=ax, leaf_font_size=font, link_color_func=lambda _: "0.35")
    by_label = dict(zip(labels, cats))
    for tick in ax.get_yticklabels():
        tick.set_color(colors[by_label[tick.get_text()]])
    ax.set_xlabel(f"{metric if method not in ('ward', 'centroid', 'median') else 'euclidean'} distance ({method} linkage)")
    ax.spines[["top", "right", "left"]].set_visible(False)
    _category_legend(fig, colors, width)
    ax.set_title(title or "Tasks clustered by their skill allocation", fontsize=10)
    _save(fig, path)
    # dendrogram() lists leaves bottom-to-top for orientation="left"; report them as seen.
    return [task_names[i] for i in reversed(d["leaves"])]


def plot_score_vs_params(rows: Sequence[Mapping[str, Any]], path: PathLike, *, ylabel: str = "ROUGE-L",
                         title: str | None = None) -> Path:
    """Figure 2: score against trainable parameters (log x), one line + marker series per method.

    ``rows``: dicts with ``method``, ``trainable_parameters``, ``score`` and an optional
    ``label`` (e.g. "16x4") written next to the point.
    """
    if not rows:
        raise AnalysisError("no rows to plot")
    series: dict[str, list[tuple[float, float, str]]] = {}
    for i, r in enumerate(rows):
        missing = [k for k in ("method", "trainable_parameters", "score") if r.get(k) is None]
        if missing:
            raise AnalysisError(f"row {i} ({dict(r)}) is missing {missing}")
        if float(r["trainable_parameters"]) <= 0:
            raise AnalysisError(f"row {i}: trainable_parameters must be > 0 on a log axis, got {r['trainable_parameters']}")
        series.setdefault(str(r["method"]), []).append(
            (float(r["trainable_parameters"]), float(r["score"]), str(r.get("label") or "")))
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    markers = "osD^vP*Xh<>p"
    for i, (method, pts) in enumerate(series.items()):
        pts.sort()
        xs, ys, _ = zip(*pts)
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none",
                markersize=7, label=method)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or f"{ylabel} against trainable parameters", fontsize=10)
    return _save(fig, path)


# =============================================================================================
# Tables


_REDUNDANCY_KEYS = {
    "K": ("K", "k", "n_abstract_tasks"),
    "params": ("trainable_parameters", "trainable_params", "params", "parameters"),
    "seen": ("seen_rougeL", "seen_rouge_l", "seen", "seen_rougeLsum"),
    "unseen": ("unseen_rougeL", "unseen_rouge_l", "unseen", "unseen_rougeLsum"),
}


def _pick(row: Mapping[str, Any], what: str) -> Any:
    for key in _REDUNDANCY_KEYS[what]:
        if row.get(key) is not None:
            return row[key]
    return None


def redundancy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the ablation over K (Table 4): K, trainable params, seen/unseen ROUGE-L.

    Rows are sorted by K, largest first (K = T, T/2, T/4, ...); the Δ columns are each
    row's change against that first row, which is the paper's point (little loss as K shrinks).
    Keys: ``K`` (or ``n_abstract_tasks``), ``trainable_parameters``, ``seen_rougeL``,
    ``unseen_rougeL`` (short aliases ``params``, ``seen``, ``unseen`` accepted).
    """
    if not rows:
        raise AnalysisError("no rows for the redundancy table")
    parsed = []
    for i, r in enumerate(rows):
        k = _pick(r, "K")
        if k is None:
            raise AnalysisError(f"row {i} ({dict(r)}) has no K (n_abstract_tasks)")
        parsed.append((int(k), _pick(r, "params"), _pick(r, "seen"), _pick(r, "unseen")))
    parsed.sort(key=lambda p: -p[0])
    ref_seen, ref_unseen = parsed[0][2], parsed[0][3]

    def num(v):
        return "–" if v is None else f"{float(v):.2f}"

    def delta(v, ref):
        return "–" if v is None or ref is None else f"{float(v) - float(ref):+.2f}"

    lines = ["| K | trainable params | seen ROUGE-L | Δ seen | unseen ROUGE-L | Δ unseen |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k, params, seen, unseen in parsed:
        p = "–" if params is None else f"{int(params):,}"
        lines.append(f"| {k} | {p} | {num(seen)} | {delta(seen, ref_seen)} | {num(unseen)} | {delta(unseen, ref_unseen)} |")
    return "\n".join(lines) + "\n"


# =============================================================================================
# Run folders


@dataclass
class RunInfo:
    """What :func:`analyze_run` reads from a training run folder."""

    run_dir: Path
    adapter_dir: Path
    adapter_meta: dict  # the whole adapter_config.json
    config: dict  # config.yaml
    metrics: dict | None  # metrics.json, when present
    tasks: list[str]  # training tasks in task-id order
    categories: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None

    @property
    def method(self) -> str:
        return str(self.adapter_meta.get("method", ""))

    def setting(self, key: str, default: Any = None) -> Any:
        """A train-config value at the top level of config.yaml or in its data/prompt section."""
        if self.config.get(key) is not None:
            return self.config[key]
        for section in ("data", "prompt", "train"):
            sub = self.config.get(section)
            if isinstance(sub, Mapping) and sub.get(key) is not None:
                return sub[key]
        return default


def read_run(run_dir: PathLike) -> RunInfo:
    """Read and check a run folder's adapter/adapter_config.json, config.yaml and metrics.json.

    Every missing or malformed piece is an :class:`AnalysisError` naming the file (and the key).
    """
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run folder {run_dir} does not exist")
    adapter_dir = run_dir / "adapter"
    cfg_file = adapter_dir / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AnalysisError(f"{cfg_file} not found: a run folder must hold the trained adapter in <run>/adapter/")
    try:
        meta = read_adapter_config(adapter_dir)
    except AdapterMismatchError as e:  # malformed JSON or not an orchmoe adapter config
        raise AnalysisError(str(e)) from e
    md = meta.get("metadata") or {}
    if isinstance(md.get("task_to_id"), Mapping) and md["task_to_id"]:
        tasks = sorted(md["task_to_id"], key=lambda t: int(md["task_to_id"][t]))
    elif md.get("task_names"):
        tasks = [str(t) for t in md["task_names"]]
    else:
        raise AnalysisError(f"{cfg_file}: metadata has neither 'task_to_id' nor 'task_names' (the training tasks)")
    n_tasks = meta["config"].get("n_tasks")
    if meta.get("method") in ("poly", "mhr") and n_tasks is not None and n_tasks != len(tasks):
        raise AnalysisError(f"{cfg_file}: metadata lists {len(tasks)} tasks but the {meta['method']} adapter has n_tasks={n_tasks}")

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise AnalysisError(f"{config_file} not found: the resolved training config is needed to rebuild the prompts")
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise AnalysisError(f"{config_file} is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise AnalysisError(f"{config_file} must hold a mapping, got {type(config).__name__}")

    metrics = None
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{metrics_file} is not valid JSON: {e}") from e

    categories = {str(k): str(v) for k, v in (md.get("categories") or {}).items()}
    info = RunInfo(run_dir, adapter_dir, meta, config, metrics, tasks, categories)
    data = config.get("data")
    data_dir = md.get("data_dir") or info.setting("data_dir") or (data if isinstance(data, str) else None)
    info.data_dir = None if data_dir is None else str(data_dir)
    return info


def _model_spec(info: RunInfo) -> str | None:
    """config.yaml's ``model`` (None = the default model); without the key, the adapter's base-model name."""
    if "model" not in info.config:
        return info.adapter_meta.get("base_model", {}).get("name")
    spec = info.config["model"]
    if isinstance(spec, Mapping):
        spec = spec.get("name_or_path") or spec.get("path") or spec.get("name")
    return None if spec is None else str(spec)


def load_run_model(info: RunInfo, *, model: PathLike | None = None, device: str | torch.device | None = None):
    """(RoutedModel in eval mode, tokenizer): the run's base model with its adapter loaded.

    The base model is config.yaml's ``model`` (None = the default SmolLM2), unless ``model``
    overrides it (a run trained elsewhere, with another checkpoint path).
    """
    from .model import load_adapter
    from .models import load_model_and_tokenizer

    spec = os.fspath(model) if model is not None else _model_spec(info)
    base, tokenizer, _ = load_model_and_tokenizer(spec, device=device)
    routed = load_adapter(base, info.adapter_dir)
    routed.eval()
    return routed, tokenizer


def build_task_prompts(info: RunInfo, tokenizer: Any, *, decoder_only: bool = True, max_prompts_per_task: int = 32,
                       data_dir: PathLike | None = None) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Prompts of every training task, tokenised exactly as in training (n_pos, max_source_len,
    chat_template from config.yaml). Uses each task's held-out eval instances first (the same
    seeded split as training), so pi is measured on inputs the router did not fit.

    Also fills ``info.categories`` from the task files for tasks the metadata did not cover.
    """
    from .data import encode_prompt, load_task, sample_instances

    root = os.fspath(data_dir) if data_dir is not None else info.data_dir
    if root is None:
        raise AnalysisError(f"no data directory: {info.adapter_dir / ADAPTER_CONFIG} metadata has no 'data_dir' and "
                            f"{info.run_dir / 'config.yaml'} no data/data_dir; pass data_dir=...")
    chat = info.setting("chat_template", False)
    if isinstance(chat, str):  # "auto": the tokenizer's template when it has one; "true"/"false" as written
        chat = tokenizer.chat_template is not None if chat.lower() == "auto" else chat.lower() in ("true", "yes", "1")
    kwargs = dict(n_pos=int(info.setting("n_pos", 2)), max_source_len=int(info.setting("max_source_len", 512)),
                  decoder_only=decoder_only, chat_template=bool(chat))
    seed = int(info.setting("seed", 0))
    prompts: dict[str, list[tuple[list[int], list[int]]]] = {}
    for name in info.tasks:
        task = load_task(root, name)
        info.categories.setdefault(name, task.category)
        _, chosen = sample_instances(task, 0, min(max_prompts_per_task, len(task.instances)), seed)
        ids = [encode_prompt(tokenizer, task, inst["input"], **kwargs) for inst in chosen]
        prompts[name] = [(x, [1] * len(x)) for x in ids]
    return prompts


# =============================================================================================
# The whole analysis


def _top_skills(row: np.ndarray, n: int = 3) -> list[tuple[int, float]]:
    idx = np.argsort(-row, kind="stable")[:min(n, row.shape[0])]
    return [(int(i), float(row[i])) for i in idx]


def _round(x: np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(x, dtype=np.float64), digits).tolist()


def analyze_model(model: RoutedModel, out_dir: PathLike, *, tasks: Sequence[str] | None = None,
                  categories: Mapping[str, str] | None = None, prompts_by_task: Mapping[str, Any] | None = None,
                  batch_size: int = 32, max_layers: int = 12, extra: Mapping[str, Any] | None = None) -> dict:
    """All artefacts for one adapter: heatmaps, dendrogram, analysis.json and analysis.md.

    OrchMoE needs ``prompts_by_task`` (training task -> prompts); Poly/MHR need ``tasks`` in
    task-id order (their allocation rows). ``categories`` maps task -> SuperNI category.
    """
    kind = _allocation_kind(model)
    cfg = model.adapter_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    matrices = allocation_matrices(model)
    result: dict[str, Any] = {"method": cfg.method, "n_layers": len(matrices), "n_skills": cfg.n_skills, **(extra or {})}
    files: dict[str, str] = {}

    if kind == "prompt":
        if not prompts_by_task:
            raise AnalysisError("an OrchMoE analysis needs prompts_by_task (the training tasks' prompts)")
        pis = prompt_task_probabilities(model, prompts_by_task, batch_size)
        task_list = list(pis)
        mean_pi = np.stack([pis[t].mean(0) for t in task_list])  # (T, K)
        assignment = mean_pi.argmax(1)
        profile = task_skill_profile(matrices, mean_pi)
        row_label = "abstract task"
        # Share of a task's prompts whose own argmax is the task's abstract task: 1 = the router
        # routes the task as a whole, lower = it splits the task's instances.
        consistency = [float((pis[t].argmax(1) == a).mean()) for t, a in zip(task_list, assignment)]
        result.update(n_abstract_tasks=cfg.n_abstract_tasks, n_prompts={t: int(pis[t].shape[0]) for t in task_list})
    else:
        task_list = list(tasks) if tasks is not None else [f"task{i}" for i in range(cfg.n_tasks)]
        if len(task_list) != cfg.n_tasks:
            raise AnalysisError(f"{len(task_list)} task names for a {cfg.method} adapter with n_tasks={cfg.n_tasks}")
        profile = task_skill_profile(matrices)
        mean_pi = assignment = consistency = None
        row_label = "task"
    cats = {t: str((categories or {}).get(t, "Unknown")) for t in task_list}
    result.update(tasks=task_list, categories=cats, n_tasks=len(task_list), n_categories=len(set(cats.values())))

    files["allocation_heatmaps"] = plot_allocation_heatmaps(
        matrices, out / "allocation_heatmaps.png", max_layers=max_layers, row_label=row_label,
        title=f"{cfg.method}: task-skill allocation per layer").name
    files["task_skill_heatmap"] = plot_task_heatmap(profile, task_list, cats, out / "task_skill_heatmap.png",
                                                    col_label="skill", center=1.0 / profile.shape[1]).name
    if mean_pi is not None:
        files["task_abstract_heatmap"] = plot_task_heatmap(
            mean_pi, task_list, cats, out / "task_abstract_heatmap.png", col_label="abstract task",
            title="Mean π(x) per training task (Task Router)").name
    spread = float(np.mean([np.abs(m - 1.0 / m.shape[1]).mean() for m in matrices.values()]))
    gaps = np.abs(profile[:, None, :] - profile[None, :, :]).sum(-1)  # (T, T) L1 distances of task profiles
    result["allocation_spread"] = round(spread, 6)
    result["max_task_profile_distance"] = round(float(gaps.max()), 6)
    result["allocations_uniform"] = spread < UNIFORM_SPREAD
    if len(task_list) >= 2 and not result["allocations_uniform"]:
        leaves = plot_dendrogram(profile, task_list, cats, out / "dendrogram.png")
        files["dendrogram"] = "dendrogram.png"
        n_clusters = min(result["n_categories"], len(task_list))
        clusters = cluster_tasks(profile, n_clusters)
        result["dendrogram_leaves"] = leaves
        result["cluster_agreement"] = {"n_clusters_requested": n_clusters,
                                       **category_agreement(clusters.tolist(), [cats[t] for t in task_list])}
        result["clusters"] = {t: int(c) for t, c in zip(task_list, clusters)}

    result["task_skill_profile"] = {t: _round(r) for t, r in zip(task_list, profile)}
    result["top_skills"] = {t: [s for s, _ in _top_skills(r)] for t, r in zip(task_list, profile)}
    if mean_pi is not None:
        result["assignment"] = {t: int(a) for t, a in zip(task_list, assignment)}
        result["mean_pi"] = {t: _round(r) for t, r in zip(task_list, mean_pi)}
        result["assignment_consistency"] = {t: round(c, 4) for t, c in zip(task_list, consistency)}
        result["category_agreement"] = category_agreement(assignment.tolist(), [cats[t] for t in task_list])
        result["abstract_task_sizes"] = {int(k): int(v) for k, v in sorted(Counter(assignment.tolist()).items())}

    np.savez_compressed(out / "allocations.npz", profile=profile, tasks=np.asarray(task_list),
                        **({"mean_pi": mean_pi} if mean_pi is not None else {}),
                        **{f"layer:{p}": m for p, m in matrices.items()})
    files["allocations"] = "allocations.npz"
    files["analysis_md"] = "analysis.md"
    result["files"] = files
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    (out / "analysis.md").write_text(_markdown(result, profile, mean_pi))
    return result


def _chance(agreement: Mapping[str, Any]) -> str:
    return f" (chance {agreement['nmi_chance']:.3f})" if "nmi_chance" in agreement else ""


def _markdown(r: Mapping[str, Any], profile: np.ndarray, mean_pi: np.ndarray | None) -> str:
    lines = [f"# Routing analysis: {r['method']}", ""]
    if r.get("run_dir"):
        lines.append(f"Run: `{r['run_dir']}`  ")
    lines.append(f"{r['n_tasks']} training tasks in {r['n_categories']} categories, {r['n_skills']} skills, "
                 f"{r['n_layers']} adapted layers" + (f", K = {r['n_abstract_tasks']} abstract tasks." if mean_pi is not None else "."))
    lines.append("")
    ca = r.get("category_agreement")
    if ca:
        lines.append(f"**Abstract task vs SuperNI category**: NMI = {ca['nmi']:.3f}{_chance(ca)}, purity = {ca['purity']:.3f}, "
                     f"inverse purity = {ca['inverse_purity']:.3f} ({ca['n_groups']} of {r['n_abstract_tasks']} abstract "
                     f"tasks used).  ")
    if r.get("allocations_uniform"):
        lines.append(f"**The skill allocations are indistinguishable from uniform**: mean |w − 1/S| = "
                     f"{r['allocation_spread']:.4f} over layers (below {UNIFORM_SPREAD}), largest L1 distance between two "
                     f"tasks' skill profiles {r['max_task_profile_distance']:.4f}. Every task uses every skill alike, so "
                     "the mixture acts as one shared adapter; no dendrogram is drawn (it would cluster noise).  ")
    else:
        lines.append(f"Skill allocations: mean |w − 1/S| = {r['allocation_spread']:.4f} over layers; largest L1 distance "
                     f"between two tasks' skill profiles {r['max_task_profile_distance']:.4f}.  ")
    cl = r.get("cluster_agreement")
    if cl:
        lines.append(f"**Dendrogram cut into {cl['n_clusters_requested']} clusters vs category**: NMI = {cl['nmi']:.3f}{_chance(cl)}, "
                     f"purity = {cl['purity']:.3f}.")
    headline = (r.get("metrics") or {}) if isinstance(r.get("metrics"), Mapping) else {}
    scalars = {k: v for k, v in headline.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += ["", "Run metrics: " + ", ".join(f"{k} = {v:.4g}" for k, v in list(scalars.items())[:8]) + "."]
    lines += ["", "| task | category | abstract task (mean π) | top skills (allocation) |", "|---|---|---|---|"]
    tasks = r["tasks"]
    for i, t in enumerate(tasks):
        if mean_pi is not None:
            a = int(r["assignment"][t])
            abstract = f"{a} ({mean_pi[i, a]:.2f})"
        else:
            abstract = "– (routed by task id)"
        top = ", ".join(f"s{s} ({v:.2f})" for s, v in _top_skills(profile[i]))
        lines.append(f"| {t} | {r['categories'][t]} | {abstract} | {top} |")
    lines += ["", "## Figures", ""]
    captions = {
        "allocation_heatmaps": "Per-layer task-skill allocation (evaluation mode)",
        "task_skill_heatmap": "Per-task skill allocation, averaged over layers",
        "task_abstract_heatmap": "Mean π(x) per training task",
        "dendrogram": "Tasks clustered by skill allocation (average linkage, cosine distance)",
    }
    for key, caption in captions.items():
        if key in r["files"]:
            lines.append(f"![{caption}]({r['files'][key]})")
            lines.append("")
    return "\n".join(lines)


def analyze_run(run_dir: PathLike, out_dir: PathLike | None = None, *, model: PathLike | None = None,
                data_dir: PathLike | None = None, max_prompts_per_task: int = 32, batch_size: int = 32,
                device: str | torch.device | None = None, max_layers: int = 12) -> dict:
    """Analyse a training run folder; writes ``<run>/analysis/`` (or ``out_dir``), returns analysis.json's dict.

    Reads ``<run>/adapter/`` (adapter + metadata: task_to_id/task_names, categories,
    data_dir), ``<run>/config.yaml`` (model, n_pos, max_source_len, chat_template, seed) and,
    when present, ``<run>/metrics.json``. ``model`` / ``data_dir`` override the recorded paths.
    """
    info = read_run(run_dir)
    if info.method not in ("orchmoe", "poly", "mhr"):
        raise AnalysisError(f"{info.adapter_dir / ADAPTER_CONFIG}: a {info.method!r} adapter has no task-skill "
                            "allocation to analyse (OrchMoE, Poly and MHR have one)")
    routed, tokenizer = load_run_model(info, model=model, device=device)
    prompts = None
    if info.method == "orchmoe":
        prompts = build_task_prompts(info, tokenizer, decoder_only=not routed.is_encoder_decoder,
                                     max_prompts_per_task=max_prompts_per_task, data_dir=data_dir)
    elif info.data_dir is not None or data_dir is not None:
        _fill_categories(info, data_dir)
    extra: dict[str, Any] = {"run_dir": str(info.run_dir), "base_model": info.adapter_meta.get("base_model", {}).get("name")}
    if info.metrics is not None:
        extra["metrics"] = _headline_metrics(info.metrics)
    out = Path(out_dir) if out_dir is not None else info.run_dir / "analysis"
    return analyze_model(routed, out, tasks=info.tasks, categories=info.categories, prompts_by_task=prompts,
                         batch_size=batch_size, max_layers=max_layers, extra=extra)


def _fill_categories(info: RunInfo, data_dir: PathLike | None) -> None:
    """Categories from the task files, for tasks the adapter metadata did not label."""
    from .data import DataError, load_task

    root = os.fspath(data_dir) if data_dir is not None else info.data_dir
    for name in info.tasks:
        if name not in info.categories:
            try:
                info.categories[name] = load_task(root, name).category
            except DataError:
                continue


def _headline_metrics(metrics: Any) -> dict:
    """Scalar entries of metrics.json (top level and one level down), for the summary."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, Mapping):
            for k2, v2 in v.items():
                if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    out[f"{k}.{k2}"] = v2
    return out
