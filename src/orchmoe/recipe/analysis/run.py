"""`orchmoe analyze RUN`: the paper's analyses of a trained adapter, from a run folder.

Reads the run's adapter and configuration (`RunFolder`), rebuilds the run's seeded data to prompt
the Task Router with held-out instances of every training task, and writes into ``<run>/analysis/``:
per-layer allocation heatmaps, the per-task skill heatmap, the mean-pi heatmap (OrchMoE), the task
dendrogram (unless the allocations are indistinguishable from uniform), ``allocations.npz``,
``analysis.json`` and ``analysis.md``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchmoe.adapters.folder import AdapterMismatchError, describe_adapter_config, load_adapter, read_adapter_config
from orchmoe.core.diagnostics import UNIFORM_SPREAD, allocation_spread
from orchmoe.data import encode_prompt
from orchmoe.loading.pretrained import load_model_and_tokenizer
from orchmoe.recipe.analysis.allocations import (
    AnalysisError,
    allocation_kind,
    allocation_matrices,
    category_agreement,
    cluster_tasks,
    prompt_task_probabilities,
    task_skill_profile,
)
from orchmoe.recipe.analysis.markdown import analysis_markdown, top_skills
from orchmoe.recipe.analysis.plots import plot_allocation_heatmaps, plot_dendrogram, plot_task_heatmap
from orchmoe.recipe.args import ArgumentsError
from orchmoe.recipe.run_data import build_data, data_arguments
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.tuner.model import RoutedModel
from orchmoe.utils.fileio import atomic_write_text, path_kind

__all__ = ["RunInfo", "read_run", "load_run_model", "build_task_prompts", "analyze_model", "analyze_run"]

PathLike = str | os.PathLike


@dataclass
class RunInfo:
    """What an analysis reads from a training run folder."""

    folder: RunFolder
    cfg: dict  # the run's options (config.yaml)
    adapter_meta: dict  # the whole adapter_config.json
    metrics: dict | None  # metrics.json, when present
    tasks: list[str]  # training tasks in task-id order
    categories: dict[str, str]

    @property
    def method(self) -> str:
        return describe_adapter_config(self.adapter_meta)["method"]


def read_run(run_dir: PathLike) -> RunInfo:
    """The run's adapter metadata, configuration and metrics; every missing or malformed piece is an
    `AnalysisError` naming the file."""
    folder = RunFolder(run_dir)
    try:
        folder.require_existing()
    except OSError as e:
        raise AnalysisError(str(e)) from None
    try:
        meta = read_adapter_config(folder.adapter_dir)
    except (FileNotFoundError, AdapterMismatchError) as e:
        raise AnalysisError(str(e)) from None
    described = describe_adapter_config(meta)
    md = described["record"].get("metadata") or {}
    if isinstance(md.get("task_to_id"), Mapping) and md["task_to_id"]:
        tasks = sorted(md["task_to_id"], key=lambda t: int(md["task_to_id"][t]))
    else:
        raise AnalysisError(f"{folder.adapter_dir}: the adapter metadata has no 'task_to_id' (the training tasks)")
    n_tasks = described["fields"].get("n_tasks")
    if n_tasks is not None and n_tasks != len(tasks):
        raise AnalysisError(
            f"{folder.adapter_dir}: metadata lists {len(tasks)} tasks but the {described['method']} adapter "
            f"has n_tasks={n_tasks}"
        )
    try:
        cfg, _ = folder.read_config()
        metrics = folder.read_metrics() if (folder / RunFolder.METRICS).is_file() else None
    except (FileNotFoundError, ArgumentsError) as e:
        raise AnalysisError(str(e)) from None
    categories = {str(k): str(v) for k, v in (md.get("categories") or {}).items()}
    return RunInfo(folder, cfg, meta, metrics, tasks, categories)


def load_run_model(
    info: RunInfo, *, model: PathLike | None = None, device: str | torch.device | None = None
) -> tuple[RoutedModel, Any]:
    """(RoutedModel in eval mode, tokenizer): the run's base model (or ``model``) with its adapter."""
    spec = os.fspath(model) if model is not None else info.cfg.get("model")
    base, tokenizer, _ = load_model_and_tokenizer(spec, dtype=info.cfg.get("dtype", "auto"), device=device)
    routed = load_adapter(base, info.folder.adapter_dir)
    return routed.eval(), tokenizer


def build_task_prompts(
    info: RunInfo,
    tokenizer: Any,
    *,
    decoder_only: bool = True,
    max_prompts_per_task: int = 32,
    data: PathLike | None = None,
) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Prompts of every training task, built as in training, from the run's own seeded held-out
    instances (training instances for a task without any), so pi is measured on inputs the router did
    not fit. ``data`` overrides where the run's data are now."""
    data_args = data_arguments(info.cfg, unseen_tasks="0", data=os.fspath(data) if data else None)
    split = build_data(data_args, int(info.cfg.get("seed", 0)))
    if sorted(split.task_to_id) != sorted(info.tasks):
        raise AnalysisError(
            f"the tasks rebuilt from {info.folder / RunFolder.CONFIG} are not the adapter's; check the data"
        )
    by_task: dict[str, list] = {t: [] for t in info.tasks}
    for ex in list(split.eval) + list(split.train):  # disjoint by construction
        if len(by_task[ex.task]) < max_prompts_per_task:
            by_task[ex.task].append(ex)
    for t in by_task:
        info.categories.setdefault(t, split.task_defs[t].category)
    settings = {
        "n_pos": data_args.n_pos,
        "max_source_len": data_args.max_source_len,
        "chat_template": data_args.chat_template,
    }
    return {
        t: [
            (ids, [1] * len(ids))
            for ids in (
                encode_prompt(tokenizer, split.task_defs[t], ex.input, decoder_only=decoder_only, **settings)
                for ex in examples
            )
        ]
        for t, examples in by_task.items()
    }


def _round(x: np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(x, dtype=np.float64), digits).tolist()


def _task_rows(
    model: RoutedModel,
    matrices: dict,
    kind: str,
    tasks: Sequence[str] | None,
    prompts_by_task: Mapping[str, Any] | None,
    batch_size: int,
) -> dict[str, Any]:
    """Per training task: its skill profile and, for OrchMoE, its mean pi, abstract task and consistency."""
    cfg = model.adapter_config
    if kind != "prompt":
        task_list = list(tasks) if tasks is not None else [f"task{i}" for i in range(cfg.n_tasks)]
        if len(task_list) != cfg.n_tasks:
            raise AnalysisError(f"{len(task_list)} task names for a {cfg.method} adapter with n_tasks={cfg.n_tasks}")
        return {"tasks": task_list, "profile": task_skill_profile(matrices), "mean_pi": None}
    if not prompts_by_task:
        raise AnalysisError("an OrchMoE analysis needs prompts_by_task (the training tasks' prompts)")
    pis = prompt_task_probabilities(model, prompts_by_task, batch_size)
    task_list = list(pis)
    mean_pi = np.stack([pis[t].mean(0) for t in task_list])  # (T, K)
    assignment = mean_pi.argmax(1)
    # Share of a task's prompts whose own argmax is the task's abstract task: 1 = the router routes the
    # task as a whole, lower = it splits the task's instances.
    consistency = [float((pis[t].argmax(1) == a).mean()) for t, a in zip(task_list, assignment)]
    return {
        "tasks": task_list,
        "profile": task_skill_profile(matrices, mean_pi),
        "mean_pi": mean_pi,
        "assignment": assignment,
        "consistency": consistency,
        "n_prompts": {t: int(pis[t].shape[0]) for t in task_list},
    }


def _figures(
    out: Path,
    rows: dict,
    matrices: dict,
    cats: dict,
    method: str,
    row_label: str,
    max_layers: int,
    draw_dendrogram: bool,
) -> tuple[dict[str, str], list[str] | None]:
    """The figures' file names, and the dendrogram's leaves (top to bottom) when one is drawn."""
    task_list, profile = rows["tasks"], rows["profile"]
    files = {
        "allocation_heatmaps": plot_allocation_heatmaps(
            matrices,
            out / "allocation_heatmaps.png",
            max_layers=max_layers,
            row_label=row_label,
            title=f"{method}: task-skill allocation per layer",
        ).name,
        "task_skill_heatmap": plot_task_heatmap(
            profile, task_list, cats, out / "task_skill_heatmap.png", col_label="skill", center=1.0 / profile.shape[1]
        ).name,
    }
    if rows["mean_pi"] is not None:
        files["task_abstract_heatmap"] = plot_task_heatmap(
            rows["mean_pi"],
            task_list,
            cats,
            out / "task_abstract_heatmap.png",
            col_label="abstract task",
            title="Mean π(x) per training task (Task Router)",
        ).name
    leaves = None
    if draw_dendrogram:
        leaves = plot_dendrogram(profile, task_list, cats, out / "dendrogram.png")
        files["dendrogram"] = "dendrogram.png"
    return files, leaves


def analyze_model(
    model: RoutedModel,
    out_dir: PathLike,
    *,
    tasks: Sequence[str] | None = None,
    categories: Mapping[str, str] | None = None,
    prompts_by_task: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    max_layers: int = 12,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """All artefacts for one adapter: heatmaps, dendrogram, allocations.npz, analysis.json and analysis.md.

    Args:
        model: an OrchMoE, Poly or MHR `RoutedModel`.
        out_dir: the folder to write.
        tasks: Poly/MHR: the training tasks in task-id order (their allocation rows).
        categories: task -> SuperNI category.
        prompts_by_task: OrchMoE: training task -> prompts (for pi).
    Returns:
        The analysis.json dict.
    """
    kind = allocation_kind(model)
    cfg = model.adapter_config
    out = _analysis_folder(out_dir)
    matrices = allocation_matrices(model)
    rows = _task_rows(model, matrices, kind, tasks, prompts_by_task, batch_size)
    task_list, profile, mean_pi = rows["tasks"], rows["profile"], rows["mean_pi"]
    cats = {t: str((categories or {}).get(t, "Unknown")) for t in task_list}
    spread = allocation_spread(model)
    gaps = np.abs(profile[:, None, :] - profile[None, :, :]).sum(-1)  # (T, T) L1 distances of task profiles
    result: dict[str, Any] = {
        "method": cfg.method,
        "n_layers": len(matrices),
        "n_skills": cfg.n_skills,
        **(extra or {}),
        "tasks": task_list,
        "categories": cats,
        "n_tasks": len(task_list),
        "n_categories": len(set(cats.values())),
        "allocation_spread": round(spread, 6),
        "max_task_profile_distance": round(float(gaps.max()), 6),
        "allocations_uniform": spread < UNIFORM_SPREAD,
    }
    draw = len(task_list) >= 2 and not result["allocations_uniform"]
    result["files"], leaves = _figures(
        out, rows, matrices, cats, cfg.method, "abstract task" if kind == "prompt" else "task", max_layers, draw
    )
    if draw:
        result.update(dendrogram_leaves=leaves, **_clusters(profile, task_list, cats, result["n_categories"]))
    result["task_skill_profile"] = {t: _round(r) for t, r in zip(task_list, profile)}
    result["top_skills"] = {t: [s for s, _ in top_skills(r)] for t, r in zip(task_list, profile)}
    if mean_pi is not None:
        result.update(n_abstract_tasks=cfg.n_abstract_tasks, **_assignment(rows, cats))
    np.savez_compressed(
        out / "allocations.npz",
        profile=profile,
        tasks=np.asarray(task_list),
        **({"mean_pi": mean_pi} if mean_pi is not None else {}),
        **{f"layer:{p}": m for p, m in matrices.items()},
    )
    result["files"].update(allocations="allocations.npz", analysis_md="analysis.md")
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=2))
    atomic_write_text(out / "analysis.md", analysis_markdown(result, profile, mean_pi))
    return result


#: every file an analysis writes: a folder holding anything else is the user's, never written into
ANALYSIS_FILES = frozenset(
    {
        "analysis.json",
        "analysis.md",
        "allocations.npz",
        "allocation_heatmaps.png",
        "task_skill_heatmap.png",
        "task_abstract_heatmap.png",
        "dendrogram.png",
    }
)


def _analysis_folder(out_dir: PathLike) -> Path:
    """``out_dir``, created if absent; refused when it is not a folder (a file, a link, a FIFO) or holds files
    an analysis does not write, so that ``--out`` never overwrites a user's own ``analysis.md``."""
    out = Path(out_dir)
    kind = path_kind(out)
    if kind not in (None, "folder"):
        raise AnalysisError(f"analysis output {out} is a {kind}; name a new or empty folder")
    if kind == "folder":
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ANALYSIS_FILES or not p.is_file())
        if foreign:
            raise AnalysisError(
                f"analysis output {out} holds files an analysis did not write ({', '.join(foreign[:5])}); "
                "name a new or empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _clusters(profile: np.ndarray, tasks: list[str], cats: dict[str, str], n_categories: int) -> dict[str, Any]:
    """The dendrogram cut into as many clusters as categories, and its agreement with them."""
    n_clusters = min(n_categories, len(tasks))
    clusters = cluster_tasks(profile, n_clusters)
    return {
        "cluster_agreement": {
            "n_clusters_requested": n_clusters,
            **category_agreement(clusters.tolist(), [cats[t] for t in tasks]),
        },
        "clusters": {t: int(c) for t, c in zip(tasks, clusters)},
    }


def _assignment(rows: dict, cats: dict[str, str]) -> dict[str, Any]:
    """OrchMoE: each task's abstract task, mean pi, consistency; the abstract tasks against the categories."""
    tasks, assignment = rows["tasks"], rows["assignment"]
    return {
        "n_prompts": rows["n_prompts"],
        "assignment": {t: int(a) for t, a in zip(tasks, assignment)},
        "mean_pi": {t: _round(r) for t, r in zip(tasks, rows["mean_pi"])},
        "assignment_consistency": {t: round(c, 4) for t, c in zip(tasks, rows["consistency"])},
        "category_agreement": category_agreement(assignment.tolist(), [cats[t] for t in tasks]),
        "abstract_task_sizes": {int(k): int(v) for k, v in sorted(Counter(assignment.tolist()).items())},
    }


def analyze_run(
    run_dir: PathLike,
    out_dir: PathLike | None = None,
    *,
    model: PathLike | None = None,
    data: PathLike | None = None,
    max_prompts_per_task: int = 32,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    max_layers: int = 12,
) -> dict:
    """Analyse a training run folder; writes ``<run>/analysis/`` (or ``out_dir``), returns analysis.json's dict.

    ``model`` / ``data`` override where the base model and the data are now (a run trained elsewhere).
    """
    info = read_run(run_dir)
    routed, tokenizer = load_run_model(info, model=model, device=device)
    allocation_kind(routed)  # the router says whether it has a task-skill allocation to analyse
    prompts = None
    if routed.adapter_config.routing == "prompt":
        prompts = build_task_prompts(
            info,
            tokenizer,
            decoder_only=not routed.is_encoder_decoder,
            max_prompts_per_task=max_prompts_per_task,
            data=data,
        )
    extra: dict[str, Any] = {
        "run_dir": str(info.folder.path),
        "base_model": (describe_adapter_config(info.adapter_meta)["record"].get("base_model") or {}).get("name"),
    }
    if info.metrics is not None:
        extra["metrics"] = _headline_metrics(info.metrics)
    out = Path(out_dir) if out_dir is not None else info.folder / RunFolder.ANALYSIS
    if out_dir is None:
        info.folder.claim()  # writing into the run folder: not while a training or an eval writes there
    try:
        return analyze_model(
            routed,
            out,
            tasks=info.tasks,
            categories=info.categories,
            prompts_by_task=prompts,
            batch_size=batch_size,
            max_layers=max_layers,
            extra=extra,
        )
    finally:
        info.folder.release()


def _headline_metrics(metrics: Any) -> dict:
    """The overall scores of metrics.json (seen/unseen ROUGE-L, ROUGE-Lsum, EM) for the summary."""
    out = {}
    for part in ("seen", "unseen"):
        for k, v in (metrics.get(part, {}) or {}).get("overall", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
                out[f"{part}.{k}"] = v
    return out
