"""The analysis figures (matplotlib's object API, never pyplot, so a notebook's backend is untouched):
per-layer allocation heatmaps, task heatmaps, the task dendrogram, score against trainable parameters."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchmoe.recipe.analysis.allocations import AnalysisError, linkage_matrix

__all__ = ["plot_allocation_heatmaps", "plot_task_heatmap", "plot_dendrogram", "plot_score_vs_params"]

PathLike = str | os.PathLike


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
    return f"{side}L{parts[numbers[0]]} " + ".".join(parts[numbers[-1] + 1 :])


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
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=ncols,
        fontsize=font,
        title="category",
        title_fontsize=font,
        frameon=False,
    )


def plot_allocation_heatmaps(
    matrices: Mapping[str, np.ndarray],
    path: PathLike,
    *,
    max_layers: int = 12,
    row_label: str = "abstract task",
    title: str | None = None,
) -> Path:
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
                ax.text(
                    s, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 * vmax else "black"
                )
    fig.colorbar(
        im,
        ax=axes,
        shrink=min(0.8, 4.0 / (nrows * (cell_h + 0.6))) if nrows * cell_h > 5 else 0.8,
        aspect=25,
        label="allocation weight (row sums to 1)",
    )
    shown = f" ({len(mats)} of {len(matrices)} layers)" if len(mats) < len(matrices) else ""
    fig.suptitle((title or "Task-skill allocation per layer") + shown, fontsize=10)
    return _save(fig, path)


def _leaf_order(profile: np.ndarray, method: str = "average", metric: str = "cosine") -> list[int]:
    from scipy.cluster.hierarchy import leaves_list

    if profile.shape[0] < 3:
        return list(range(profile.shape[0]))
    return leaves_list(linkage_matrix(profile, method, metric)).tolist()[::-1]  # top-down, as plot_dendrogram draws


def plot_task_heatmap(
    profile: np.ndarray,
    task_names: Sequence[str],
    categories: Sequence[str] | Mapping[str, str] | None,
    path: PathLike,
    *,
    col_label: str = "skill",
    order: str = "cluster",
    center: float | None = None,
    title: str | None = None,
) -> Path:
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
    fig.colorbar(
        im,
        ax=ax,
        shrink=min(0.9, 5.0 / (T * 0.16 * font / 8)) if T > 40 else 0.9,
        aspect=25,
        label="mean allocation" if col_label == "skill" else "mean π(x)",
    )
    _category_legend(fig, colors, width)
    ordering = "dendrogram order" if order == "cluster" else f"{order} order"
    if center is not None:
        ordering += f"; white = {center:.3g}"
    ax.set_title(title or f"Per-task {col_label} allocation ({ordering})", fontsize=10)
    return _save(fig, path)


def plot_dendrogram(
    profile: np.ndarray,
    task_names: Sequence[str],
    categories: Sequence[str] | Mapping[str, str] | None,
    path: PathLike,
    *,
    method: str = "average",
    metric: str = "cosine",
    title: str | None = None,
) -> list[str]:
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
    Z = linkage_matrix(profile, method, metric)
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
    ax.set_xlabel(
        f"{metric if method not in ('ward', 'centroid', 'median') else 'euclidean'} distance ({method} linkage)"
    )
    ax.spines[["top", "right", "left"]].set_visible(False)
    _category_legend(fig, colors, width)
    ax.set_title(title or "Tasks clustered by their skill allocation", fontsize=10)
    _save(fig, path)
    # dendrogram() lists leaves bottom-to-top for orientation="left"; report them as seen.
    return [task_names[i] for i in reversed(d["leaves"])]


def plot_score_vs_params(
    rows: Sequence[Mapping[str, Any]], path: PathLike, *, ylabel: str = "ROUGE-L", title: str | None = None
) -> Path:
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
            raise AnalysisError(
                f"row {i}: trainable_parameters must be > 0 on a log axis, got {r['trainable_parameters']}"
            )
        series.setdefault(str(r["method"]), []).append(
            (float(r["trainable_parameters"]), float(r["score"]), str(r.get("label") or ""))
        )
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    markers = "osD^vP*Xh<>p"
    for i, (method, pts) in enumerate(series.items()):
        pts.sort()
        xs, ys, _ = zip(*pts)
        ax.plot(
            xs,
            ys,
            marker=markers[i % len(markers)],
            linestyle="-" if len(pts) > 1 else "none",
            markersize=7,
            label=method,
        )
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
