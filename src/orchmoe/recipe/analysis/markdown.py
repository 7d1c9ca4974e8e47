"""The analysis in words and tables: analysis.md of a run, and the ablation table over K (Table 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchmoe.core.diagnostics import UNIFORM_SPREAD
from orchmoe.recipe.analysis.allocations import AnalysisError
from orchmoe.utils.markdown import markdown_table

__all__ = ["analysis_markdown", "redundancy_table", "top_skills"]

_CAPTIONS = {
    "allocation_heatmaps": "Per-layer task-skill allocation (evaluation mode)",
    "task_skill_heatmap": "Per-task skill allocation, averaged over layers",
    "task_abstract_heatmap": "Mean π(x) per training task",
    "dendrogram": "Tasks clustered by skill allocation (average linkage, cosine distance)",
}


def top_skills(row: np.ndarray, n: int = 3) -> list[tuple[int, float]]:
    idx = np.argsort(-row, kind="stable")[: min(n, row.shape[0])]
    return [(int(i), float(row[i])) for i in idx]


def _chance(agreement: Mapping[str, Any]) -> str:
    return f" (chance {agreement['nmi_chance']:.3f})" if "nmi_chance" in agreement else ""


def _findings(r: Mapping[str, Any]) -> list[str]:
    """The headline sentences: agreement with categories, whether allocations moved, the clusters."""
    lines = []
    ca = r.get("category_agreement")
    if ca:
        lines.append(
            f"**Abstract task vs SuperNI category**: NMI = {ca['nmi']:.3f}{_chance(ca)}, purity = {ca['purity']:.3f}, "
            f"inverse purity = {ca['inverse_purity']:.3f} ({ca['n_groups']} of {r['n_abstract_tasks']} abstract "
            f"tasks used).  "
        )
    if r.get("allocations_uniform"):
        lines.append(
            f"**The skill allocations are indistinguishable from uniform**: mean |w − 1/S| = "
            f"{r['allocation_spread']:.4f} over layers (below {UNIFORM_SPREAD}), largest L1 distance between two "
            f"tasks' skill profiles {r['max_task_profile_distance']:.4f}. Every task uses every skill alike, so "
            "the mixture acts as one shared adapter; no dendrogram is drawn (it would cluster noise).  "
        )
    else:
        lines.append(
            f"Skill allocations: mean |w − 1/S| = {r['allocation_spread']:.4f} over layers; largest L1 distance "
            f"between two tasks' skill profiles {r['max_task_profile_distance']:.4f}.  "
        )
    cl = r.get("cluster_agreement")
    if cl:
        lines.append(
            f"**Dendrogram cut into {cl['n_clusters_requested']} clusters vs category**: NMI = {cl['nmi']:.3f}"
            f"{_chance(cl)}, purity = {cl['purity']:.3f}."
        )
    return lines


def analysis_markdown(r: Mapping[str, Any], profile: np.ndarray, mean_pi: np.ndarray | None) -> str:
    """analysis.md: what the routers learned, in words, a per-task table, and the figures."""
    lines = [f"# Routing analysis: {r['method']}", ""]
    if r.get("run_dir"):
        lines.append(f"Run: `{r['run_dir']}`  ")
    lines.append(
        f"{r['n_tasks']} training tasks in {r['n_categories']} categories, {r['n_skills']} skills, "
        f"{r['n_layers']} adapted layers"
        + (f", K = {r['n_abstract_tasks']} abstract tasks." if mean_pi is not None else ".")
    )
    lines += ["", *_findings(r)]
    headline = r.get("metrics") if isinstance(r.get("metrics"), Mapping) else {}
    scalars = {k: v for k, v in headline.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += ["", "Run metrics: " + ", ".join(f"{k} = {v:.4g}" for k, v in list(scalars.items())[:8]) + "."]
    rows = []
    for i, t in enumerate(r["tasks"]):
        if mean_pi is not None:
            a = int(r["assignment"][t])
            abstract = f"{a} ({mean_pi[i, a]:.2f})"
        else:
            abstract = "– (routed by task id)"
        rows.append([t, r["categories"][t], abstract, ", ".join(f"s{s} ({v:.2f})" for s, v in top_skills(profile[i]))])
    lines += [
        "",
        markdown_table(
            ["task", "category", "abstract task (mean π)", "top skills (allocation)"], rows, ["l", "l", "l", "l"]
        ),
        "",
        "## Figures",
        "",
    ]
    for key, caption in _CAPTIONS.items():
        if key in r["files"]:
            lines += [f"![{caption}]({r['files'][key]})", ""]
    return "\n".join(lines)


def redundancy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the ablation over K (Table 4): K, trainable params, seen/unseen ROUGE-L.

    Rows are sorted by K, largest first (K = T, T/2, T/4, ...); the Δ columns are each row's change
    against that first row, which is the paper's point (little loss as K shrinks). Keys: ``K``,
    ``trainable_parameters``, ``seen_rougeL``, ``unseen_rougeL`` (the latter two may be None).
    """
    if not rows:
        raise AnalysisError("no rows for the redundancy table")
    parsed = []
    for i, r in enumerate(rows):
        if r.get("K") is None:
            raise AnalysisError(f"row {i} ({dict(r)}) has no K (n_abstract_tasks)")
        parsed.append((int(r["K"]), r.get("trainable_parameters"), r.get("seen_rougeL"), r.get("unseen_rougeL")))
    parsed.sort(key=lambda p: -p[0])
    ref_seen, ref_unseen = parsed[0][2], parsed[0][3]

    def delta(v, ref):
        return None if v is None or ref is None else f"{float(v) - float(ref):+.2f}"

    table = [
        [
            k,
            None if p is None else f"{int(p):,}",
            None if s is None else float(s),
            delta(s, ref_seen),
            None if u is None else float(u),
            delta(u, ref_unseen),
        ]
        for k, p, s, u in parsed
    ]
    return (
        markdown_table(
            ["K", "trainable params", "seen ROUGE-L", "Δ seen", "unseen ROUGE-L", "Δ unseen"], table, ["r"] * 6
        )
        + "\n"
    )
