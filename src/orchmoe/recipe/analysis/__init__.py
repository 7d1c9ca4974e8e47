"""The paper's analyses of a trained adapter: what the routers learned.

* per-layer task-skill allocation matrices (OrchMoE's Figure 3): `allocation_matrices`,
  `plot_allocation_heatmaps`;
* which abstract task the Task Router sends each training task to, and whether those abstract tasks
  line up with the SuperNI categories: `abstract_task_assignment`, `category_agreement`;
* tasks clustered by the skills they use: `task_skill_profile`, `plot_dendrogram`, `plot_task_heatmap`;
* the result figures and tables: `plot_score_vs_params` (Figure 2), `redundancy_table` (Table 4).

`analyze_run` runs everything on a training run folder (``orchmoe analyze RUN``).
"""

from orchmoe.core.diagnostics import nmi_chance, normalized_mutual_info, purity
from orchmoe.recipe.analysis.allocations import (
    AnalysisError,
    TaskAssignment,
    abstract_task_assignment,
    allocation_matrices,
    category_agreement,
    cluster_tasks,
    prompt_task_probabilities,
    task_skill_profile,
)
from orchmoe.recipe.analysis.markdown import redundancy_table
from orchmoe.recipe.analysis.plots import (
    plot_allocation_heatmaps,
    plot_dendrogram,
    plot_score_vs_params,
    plot_task_heatmap,
)
from orchmoe.recipe.analysis.run import (
    RunInfo,
    analyze_model,
    analyze_run,
    build_task_prompts,
    load_run_model,
    read_run,
)

__all__ = [
    "AnalysisError",
    "RunInfo",
    "TaskAssignment",
    "abstract_task_assignment",
    "allocation_matrices",
    "analyze_model",
    "analyze_run",
    "build_task_prompts",
    "category_agreement",
    "cluster_tasks",
    "load_run_model",
    "nmi_chance",
    "normalized_mutual_info",
    "plot_allocation_heatmaps",
    "plot_dendrogram",
    "plot_score_vs_params",
    "plot_task_heatmap",
    "prompt_task_probabilities",
    "purity",
    "read_run",
    "redundancy_table",
    "task_skill_profile",
]
