"""Routing diagnostics: is the routing doing anything? Cheap enough to log while training.

* allocation spread: mean |w - 1/S| of the evaluation-mode task-skill allocations over layers,
  rows and skills; 0 when every row is uniform (every task uses every skill alike: the mixture
  is one shared adapter);
* for OrchMoE's Task Router over a window of training examples: the mean entropy of pi(x), the
  share of the K abstract tasks that are the argmax of some example, and the NMI of the argmax
  with the true task (when task labels exist).

Also the agreement measures the analysis reports (NMI, purity, their chance level).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "allocation_spread",
    "task_router_summary",
    "routing_record",
    "normalized_mutual_info",
    "purity",
    "nmi_chance",
    "UNIFORM_SPREAD",
]

#: below this mean |w - 1/S| the allocations are indistinguishable from uniform (the initial logits
#: U(-1e-3, 1e-3) give ~1e-4; one skill 0.01 above the others in every row gives ~0.005 for S = 4)
UNIFORM_SPREAD = 0.005


@torch.no_grad()
def allocation_spread(model) -> float | None:
    """Mean |w - 1/S| of the evaluation-mode allocations (L, rows, S); None without an allocation matrix.

    ``model`` is a `RoutedModel`; its model-level router's ``allocation_matrices()`` are read (Poly, MHR,
    OrchMoE), so LoRA and the per-token methods give None. Below `UNIFORM_SPREAD`: uniform routing.
    """
    router = getattr(model, "router", None)
    alloc = router.allocation_matrices() if router is not None else None
    if alloc is None:
        return None
    return float((alloc.float() - 1.0 / alloc.shape[-1]).abs().mean())


@torch.no_grad()
def task_router_summary(task_probs: torch.Tensor, task_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of pi(x) over a set of examples (N, K): ``pi_entropy`` (mean entropy in nats; log K
    is uniform), ``abstract_tasks_used`` (how many of the K abstract tasks are some example's argmax) and,
    with task labels, ``nmi_pi_task`` (NMI of the argmax with the task).

    Args:
        task_probs: (N, K) pi(x) of N examples.
        task_ids: (N,) their true tasks, or None.
    Returns:
        ``pi_entropy``, ``pi_entropy_max`` (log K), ``abstract_tasks_used`` (a count, of ``abstract_tasks`` = K)
        and, with ``task_ids``, ``nmi_pi_task``.
    """
    pi = task_probs.detach().float()
    K = pi.shape[-1]
    entropy = -(pi * pi.clamp_min(1e-12).log()).sum(-1).mean()
    top = pi.argmax(-1).cpu()
    out = {
        "pi_entropy": float(entropy),
        "pi_entropy_max": math.log(K),
        "abstract_tasks_used": int(top.unique().numel()),
        "abstract_tasks": K,
    }
    if task_ids is not None:
        out["nmi_pi_task"] = normalized_mutual_info(top.tolist(), task_ids.detach().cpu().tolist())
    return out


def routing_record(
    model, task_probs: torch.Tensor | None = None, task_ids: torch.Tensor | None = None
) -> dict[str, float]:
    """The diagnostics of one logging window, as flat record fields (only those that apply).

    Args:
        model: the `RoutedModel` (for `allocation_spread`).
        task_probs: (N, K) pi(x) of the window's examples (OrchMoE), or None.
        task_ids: (N,) their tasks, or None.
    Returns:
        ``allocation_spread`` when the model has allocations, plus `task_router_summary`'s fields when
        ``task_probs`` has rows.
    """
    rec: dict[str, float] = {}
    spread = allocation_spread(model)
    if spread is not None:
        rec["allocation_spread"] = spread
    if task_probs is not None and task_probs.numel():
        rec.update(task_router_summary(task_probs, task_ids))
    return rec


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float:
    """NMI = I(U;V) / mean(H(U), H(V)), natural logs (scikit-learn's default, "arithmetic").

    As in scikit-learn, two labelings that are each a single cluster count as a perfect match
    (1.0), and a zero mutual information is 0.0 whatever the entropies.

    Args:
        labels_a: one labeling of the items (any hashable labels, compared as strings).
        labels_b: another labeling of the same items, as long.
    Returns:
        NMI in [0, 1]; 1.0 for no items.
    Raises:
        ValueError: labelings of different lengths.
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"labelings of different lengths: {len(a)} and {len(b)}")
    if not a:
        return 1.0
    _, ia = np.unique(np.asarray(a, dtype=object).astype(str), return_inverse=True)
    _, ib = np.unique(np.asarray(b, dtype=object).astype(str), return_inverse=True)
    na, nb = ia.max() + 1, ib.max() + 1
    if na == nb == 1:
        return 1.0
    table = np.zeros((na, nb))
    np.add.at(table, (ia, ib), 1.0)
    n = table.sum()
    pa, pb = table.sum(1) / n, table.sum(0) / n
    nz = table > 0
    pab = table[nz] / n
    mi = float((pab * np.log(pab / np.outer(pa, pb)[nz])).sum())
    if mi <= 1e-15:
        return 0.0
    denom = 0.5 * (_entropy(table.sum(1)) + _entropy(table.sum(0)))
    return float(min(max(mi / max(denom, np.finfo(float).eps), 0.0), 1.0))


def purity(clusters: Sequence[Any], classes: Sequence[Any]) -> float:
    """Share of items whose cluster's majority class is their own class (1 = every cluster pure).

    Args:
        clusters: each item's cluster.
        classes: each item's true class, as long.
    Returns:
        Purity in (0, 1]; 1.0 for no items.
    Raises:
        ValueError: labelings of different lengths.
    """
    clusters, classes = list(clusters), list(classes)
    if len(clusters) != len(classes):
        raise ValueError(f"labelings of different lengths: {len(clusters)} and {len(classes)}")
    if not clusters:
        return 1.0
    by_cluster: dict[Any, Counter] = {}
    for c, k in zip(clusters, classes):
        by_cluster.setdefault(c, Counter())[k] += 1
    return sum(cnt.most_common(1)[0][1] for cnt in by_cluster.values()) / len(clusters)


def nmi_chance(labels_a: Sequence[Any], labels_b: Sequence[Any], n_permutations: int = 200, seed: int = 0) -> float:
    """Mean NMI after shuffling ``labels_b``: the score group sizes alone give.

    NMI is biased upwards for few items and many groups (a random grouping of 15 tasks
    already scores ~0.3), so the observed NMI means something only next to this baseline.

    Args:
        labels_a, labels_b: two labelings of the same items (`normalized_mutual_info`).
        n_permutations: shuffles averaged over.
        seed: seed of the shuffles (the result is deterministic).
    Returns:
        The mean NMI, in [0, 1].
    """
    rng = np.random.default_rng(seed)
    b = np.asarray(list(labels_b), dtype=object)
    return float(np.mean([normalized_mutual_info(labels_a, rng.permutation(b)) for _ in range(n_permutations)]))
