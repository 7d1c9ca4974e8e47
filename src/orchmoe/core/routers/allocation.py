"""Relaxed-Bernoulli allocations and the routers built on them.

Poly and MHR (task id) and OrchMoE's Skill Router share one rule, as Poly's reference code and
PEFT do: a Gumbel-sigmoid sample of learnable logits in training (sigmoid in evaluation),
normalised over the skills. The sample is drawn per example: with a batch of several tasks,
every example gets its own noise.
"""

from __future__ import annotations

import torch
from torch import nn

from orchmoe.core.config import LoraConfig, MHRConfig, PolyConfig
from orchmoe.core.registry import register_method
from orchmoe.core.routers.base import ModelRouter, Route, RoutingInputs
from orchmoe.core.routing import RoutingError

__all__ = ["logistic_noise", "relaxed_allocation", "init_logits", "ConstantRouter", "PolyRouter"]

EPS = 1e-12


def logistic_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Logistic noise log(u) - log(1 - u), u ~ U(0, 1): what RelaxedBernoulli.rsample adds to the logits.

    Args:
        shape: the noise's shape.
        like: a tensor whose device and dtype the noise takes.
    Returns:
        A tensor of ``shape``, finite (u is kept inside (eps, 1 - eps) of the dtype).
    """
    tiny = torch.finfo(like.dtype).eps
    u = torch.rand(shape, device=like.device, dtype=like.dtype).clamp_(tiny, 1 - tiny)
    return u.log() - (-u).log1p()


def relaxed_allocation(logits: torch.Tensor, training: bool, temperature: float = 1.0) -> torch.Tensor:
    """Gumbel-sigmoid sample (train) or sigmoid (eval) of ``logits``, normalised over the last (skill) axis.

    Args:
        logits: (..., S) allocation logits.
        training: draw fresh logistic noise (one sample per element) instead of the plain sigmoid.
        temperature: the relaxation temperature of the training sample.
    Returns:
        (..., S) weights, each row summing to one.
    """
    if training:
        z = torch.sigmoid((logits + logistic_noise(logits.shape, logits)) / temperature)
    else:
        z = torch.sigmoid(logits)
    return z / (z.sum(dim=-1, keepdim=True) + EPS)


def init_logits(*shape: int) -> nn.Parameter:
    """Allocation logits initialised U(-1e-3, 1e-3), as in Poly's reference code."""
    return nn.Parameter(torch.empty(*shape).uniform_(-1e-3, 1e-3))


@register_method(LoraConfig)
class ConstantRouter(ModelRouter):
    """LoRA: every input uses the single expert with weight one."""

    @classmethod
    def from_config(cls, config, n_layers: int, d_model: int) -> ConstantRouter:
        """The router of a `LoraConfig`; the arguments are those of every model router and unused here."""
        return cls()

    def forward(self, inputs: RoutingInputs) -> Route:
        """``Route(None)``: no allocation, every layer uses its one expert."""
        return Route(None)


@register_method(PolyConfig)
@register_method(MHRConfig)
class PolyRouter(ModelRouter):
    """Task-skill logits Z (L, T, h*S): one row per training task in each of L layers (h = 1: Poly, h > 1: MHR).

    Task id -1 routes an unseen task by the mean evaluation-mode allocation of the training tasks.

    Args:
        n_layers: L, the adapted layers.
        n_tasks: T, the training tasks.
        n_skills: S, the skills (experts) per layer.
        n_splits: h, routing blocks per layer (MHR).
    """

    def __init__(self, n_layers: int, n_tasks: int, n_skills: int, n_splits: int = 1) -> None:
        super().__init__()
        self.n_layers, self.n_tasks, self.n_skills, self.n_splits = n_layers, n_tasks, n_skills, n_splits
        self.logits = init_logits(n_layers, n_tasks, n_splits * n_skills)

    @classmethod
    def from_config(cls, config: PolyConfig, n_layers: int, d_model: int) -> PolyRouter:
        """The router of a `PolyConfig` / `MHRConfig`.

        Args:
            config: its ``n_tasks``, ``n_skills`` and ``n_splits`` size the logits.
            n_layers: L, the adapted layers.
            d_model: the embedding width (unused: Poly routes by task id).
        """
        return cls(n_layers, config.n_tasks, config.n_skills, config.n_splits)

    def _blocks(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.unflatten(-1, (self.n_splits, self.n_skills))  # (..., h*S) -> (..., h, S)

    def mean_allocation(self) -> torch.Tensor:
        """(L, h, S): the evaluation-mode allocation averaged over the training tasks."""
        return relaxed_allocation(self._blocks(self.logits), False).mean(1)

    def forward(self, inputs: RoutingInputs) -> Route:
        """Each example's task row in every layer (a fresh Gumbel-sigmoid sample per example in training).

        Args:
            inputs: ``task_ids`` (b,) long, -1 for an unseen task.
        Returns:
            ``Route`` with weights (L, b, h, S).
        Raises:
            RoutingError: no task ids.
        """
        task_ids = inputs.task_ids
        if task_ids is None:
            raise RoutingError("Poly/MHR route by task id: pass task_ids=... (one per example) to forward()/generate()")
        task_ids = task_ids.to(self.logits.device)
        rows = self._blocks(self.logits.index_select(1, task_ids.clamp_min(0)))  # (L, T, hS) -> (L, b, h, S)
        w = relaxed_allocation(rows, self.training)  # one noise sample per example and layer
        unseen = (task_ids < 0).view(1, -1, 1, 1)  # (1, b, 1, 1): no row of its own
        return Route(torch.where(unseen, self.mean_allocation().unsqueeze(1), w))  # (L, b, h, S)

    def allocation_parameters(self) -> list[nn.Parameter]:
        """``[Z]``: the task-skill logits, trained at ``router_lr``."""
        return [self.logits]

    def allocation(self, task_id: int) -> torch.Tensor:
        """Evaluation-mode weights of one task in every layer, (L, h, S)."""
        return relaxed_allocation(self._blocks(self.logits[:, task_id]), False)

    def allocation_matrices(self) -> torch.Tensor:
        """(L, T, S); MHR's h blocks are averaged (each block's row sums to one, so the mean does too)."""
        return relaxed_allocation(self._blocks(self.logits), False).mean(2)

    def fixed_weights(self, task_id: int | None = None, **other) -> torch.Tensor:
        """Evaluation-mode weights of one training task, for export and merging.

        Args:
            task_id: the task, 0..T-1, or -1 for an unseen task (the mean allocation, as `forward` routes it).
            **other: must be empty (other routing arguments are an error).
        Returns:
            (L, 1, h, S).
        Raises:
            RoutingError: no task id, one out of range, or other arguments.
        """
        if other:
            raise RoutingError(f"Poly/MHR export takes task_id=..., not {sorted(other)}")
        if task_id is None:
            raise RoutingError(f"exporting a Poly/MHR adapter needs task_id=... (0..{self.n_tasks - 1}, or -1)")
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not -1 <= task_id < self.n_tasks:
            raise RoutingError(f"task id {task_id!r} out of range: n_tasks={self.n_tasks} (or -1 for an unseen task)")
        if task_id == -1:
            return self.mean_allocation().unsqueeze(1)  # (L, 1, h, S)
        return self.allocation(task_id).unsqueeze(1)  # (L, 1, h, S)
