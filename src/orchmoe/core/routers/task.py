"""OrchMoE's routers: the Task Router (which abstract task a prompt belongs to, from the prompt
alone) and the Skill Router (which skills each abstract task uses, in every layer)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchmoe.core.config import PROMPT_NORMS, OrchMoEConfig
from orchmoe.core.registry import register_method
from orchmoe.core.routers.allocation import init_logits, relaxed_allocation
from orchmoe.core.routers.base import ModelRouter, Route, RoutingInputs
from orchmoe.core.routing import RoutingError

__all__ = ["TaskRouter", "SkillRouter", "OrchMoERouter"]

_STATS = ("summary_mean", "summary_var")


class TaskRouter(nn.Module):
    """pi(x) = softmax(norm(u(x)) W_task / tau) over K abstract tasks, one router per model.

    u(x) is the masked mean of the frozen input embeddings of the prompt. Most of it is
    shared by every prompt (the template, function words): on SmolLM2 the mean summary
    has ~4x the norm of a prompt's deviation from it, while 85-98% of that deviation is
    between tasks. ``prompt_norm="standardize"`` therefore centres and scales each feature
    with running statistics of the training prompts (buffers, saved with the adapter, not
    trained, always fp32) before a parameter-free layer norm, so the router sees what tells
    tasks apart; ``"layernorm"`` only applies the layer norm, ``"none"`` neither.

    Args:
        d_model: d, the width of the prompt summary (the embedding width).
        n_abstract_tasks: K, the abstract tasks.
        temperature: tau, the softmax temperature.
        hidden: 0: a linear router; > 0: one GELU hidden layer of this width.
        hard: one-hot pi (straight-through Gumbel-softmax in training, argmax in evaluation).
        prompt_norm: ``"standardize"``, ``"layernorm"`` or ``"none"`` (above).
    """

    def __init__(
        self,
        d_model: int,
        n_abstract_tasks: int,
        temperature: float = 1.0,
        hidden: int = 0,
        hard: bool = False,
        prompt_norm: str = "standardize",
    ) -> None:
        super().__init__()
        if prompt_norm not in PROMPT_NORMS:
            raise ValueError(f"prompt_norm must be one of {PROMPT_NORMS}, got {prompt_norm!r}")
        self.d_model, self.n_abstract_tasks = d_model, n_abstract_tasks
        self.temperature, self.hard, self.prompt_norm = temperature, hard, prompt_norm
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_abstract_tasks))
        else:
            self.net = nn.Linear(d_model, n_abstract_tasks)
        if prompt_norm == "standardize":
            self.register_buffer("summary_mean", torch.zeros(d_model))
            self.register_buffer("summary_var", torch.ones(d_model))
            self.register_buffer("summary_count", torch.zeros((), dtype=torch.long))  # long: casts leave it exact

    def _apply(self, fn, recurse: bool = True):
        """Statistics stay fp32 whatever the model is cast to (in bf16 they would stop moving)."""
        super()._apply(fn, recurse)
        for name in _STATS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def update_statistics(self, summary: torch.Tensor) -> None:
        """Fold a batch of summaries (b, d) into the running mean and variance (an exact
        cumulative average over every prompt seen in training, merged as Chan et al.).

        Branch-free on the device (no host sync). Under torch.distributed the batch statistics
        are those of the global batch (one all-gather of 2d+1 numbers per process), so every
        process routes with the same statistics."""
        u = summary.detach().float()  # (b, d)
        n = self.summary_count.float()
        mean, var = self.summary_mean, self.summary_var
        b, batch_mean, batch_var = self._batch_moments(u)
        total = n + b
        inv = 1.0 / torch.clamp(total, min=1.0)
        delta = batch_mean - mean
        new_var = (var * n + batch_var * b + delta * delta * (n * b * inv)) * inv
        keep = total == 0
        mean.copy_(torch.where(keep, mean, mean + delta * (b * inv)))
        var.copy_(torch.where(keep, var, new_var))
        self.summary_count.add_(b.long() if isinstance(b, torch.Tensor) else b)

    @staticmethod
    def _batch_moments(u: torch.Tensor) -> tuple[torch.Tensor | int, torch.Tensor, torch.Tensor]:
        """(count, mean, biased variance) of the rows of u, over all processes when distributed."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if u.shape[0] == 0:
                return 0, u.new_zeros(u.shape[1]), u.new_zeros(u.shape[1])
            return u.shape[0], u.mean(0), u.var(0, unbiased=False)
        n_local = u.shape[0]
        local_mean = u.sum(0) / max(n_local, 1)
        centred = ((u - local_mean) ** 2).sum(0)  # (d,) sums around the local mean: no cancellation
        packed = torch.cat([u.new_full((1,), n_local), u.sum(0), centred])  # (2d+1,); new_full: no host-to-device copy
        world = [torch.zeros_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(world, packed)
        stacked = torch.stack(world)  # (W, 2d+1)
        d = u.shape[1]
        counts = stacked[:, 0]  # (W,)
        total = counts.sum()
        means = stacked[:, 1 : 1 + d] / counts.clamp_min(1)[:, None]  # (W, d)
        mean = (means * counts[:, None]).sum(0) / total.clamp_min(1)
        m2 = stacked[:, 1 + d :].sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
        return total, mean, m2 / total.clamp_min(1)

    def normalized(self, summary: torch.Tensor) -> torch.Tensor:
        """norm(u(x)) (b, d) in the router's dtype; in training ``"standardize"`` first updates the statistics."""
        u = summary.float()  # (b, d)
        if self.prompt_norm == "standardize":
            if self.training:
                self.update_statistics(u)
            # before any statistics (mean 0, var 1) this is a uniform rescaling, which the layer norm undoes
            var = self.summary_var
            u = (u - self.summary_mean) * torch.rsqrt(var + 1e-3 * var.mean() + 1e-12)  # (b, d)
        if self.prompt_norm != "none":
            u = F.layer_norm(u, (self.d_model,))
        return u.to(next(self.parameters()).dtype)

    def logits(self, summary: torch.Tensor) -> torch.Tensor:
        """The router's logits over abstract tasks divided by tau, (b, K), from summaries (b, d)."""
        return self.net(self.normalized(summary)) / self.temperature  # (b, d) @ (d, K) -> (b, K)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """pi(x) over the K abstract tasks.

        Args:
            summary: (b, d) prompt summaries u(x) (`RoutedModel.prompt_summary`).
        Returns:
            (b, K): a softmax, or one-hot with ``hard``.
        """
        logits = self.logits(summary)
        if self.hard:
            if self.training:
                return F.gumbel_softmax(logits, tau=1.0, hard=True)
            return torch.zeros_like(logits).scatter_(
                -1, logits.argmax(-1, keepdim=True), 1.0
            )  # one-hot (b, K), no host sync
        return F.softmax(logits, dim=-1)  # (b, K)

    @staticmethod
    def balance_loss(pi: torch.Tensor) -> torch.Tensor:
        """K * sum_k mean(pi_k)^2: 1 when the batch spreads evenly, K when it collapses onto one task.

        Args:
            pi: (b, K) task probabilities.
        Returns:
            A scalar tensor.
        """
        mean = pi.mean(0)
        return pi.shape[-1] * (mean * mean).sum()


class SkillRouter(nn.Module):
    """W_skill (L, K, S): every layer's task-skill allocation logits, one (K, S) matrix per layer.

    The allocation of an example is pi(x) @ Z_hat, a convex mix of abstract-task rows. In training
    Z_hat is a Gumbel-sigmoid sample drawn per example (as Poly draws per example), so OrchMoE with
    a one-hot pi is Poly in training too.

    Args:
        n_layers: L, the adapted layers.
        n_abstract_tasks: K, the abstract tasks.
        n_skills: S, the skills per layer.
    """

    def __init__(self, n_layers: int, n_abstract_tasks: int, n_skills: int) -> None:
        super().__init__()
        self.n_layers, self.n_abstract_tasks, self.n_skills = n_layers, n_abstract_tasks, n_skills
        self.logits = init_logits(n_layers, n_abstract_tasks, n_skills)

    def forward(self, pi: torch.Tensor) -> torch.Tensor:
        """Every layer's allocation, pi(x) @ Z_hat.

        Args:
            pi: (b, K) task probabilities.
        Returns:
            (L, b, 1, S) weights, each row summing to one.
        """
        pi = pi.to(self.logits.dtype)  # (b, K)
        if self.training:
            L, K, S = self.logits.shape
            z = relaxed_allocation(self.logits.unsqueeze(1).expand(L, pi.shape[0], K, S), True)  # (L, b, K, S)
            w = torch.einsum("bk,lbks->lbs", pi, z)  # (b,K) x (L,b,K,S) -> (L,b,S)
        else:
            w = torch.einsum("bk,lks->lbs", pi, self.allocation())  # (b,K) x (L,K,S) -> (L,b,S)
        return w.unsqueeze(2)  # (L, b, 1, S)

    def allocation(self) -> torch.Tensor:
        """Evaluation-mode allocation matrices (L, K, S): the rows the paper's Figure 3 clusters."""
        return relaxed_allocation(self.logits, False)


@register_method(OrchMoEConfig)
class OrchMoERouter(ModelRouter):
    """pi(x) from the prompt (Task Router), then pi(x) @ Z_hat in every layer (Skill Router).

    Args:
        config: the `OrchMoEConfig` (K, S, the Task Router's settings, ``balance_coef``).
        n_layers: L, the adapted layers.
        d_model: d, the embedding width.
    """

    row_label = "abstract task"

    def __init__(self, config: OrchMoEConfig, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.balance_coef = config.balance_coef
        self.task_router = TaskRouter(
            d_model,
            config.n_abstract_tasks,
            config.task_temperature,
            config.task_router_hidden,
            config.hard_routing,
            config.prompt_norm,
        )
        self.skill_router = SkillRouter(n_layers, config.n_abstract_tasks, config.n_skills)

    @classmethod
    def from_config(cls, config: OrchMoEConfig, n_layers: int, d_model: int) -> OrchMoERouter:
        """The router of an `OrchMoEConfig` (arguments as the class's)."""
        return cls(config, n_layers, d_model)

    def forward(self, inputs: RoutingInputs) -> Route:
        """Route a batch of prompts.

        Args:
            inputs: ``prompt_summary`` (b, d), u(x).
        Returns:
            ``Route`` with weights (L, b, 1, S), task_probs pi (b, K) and, in training with ``balance_coef > 0``,
            the balance term as aux_loss.
        Raises:
            RoutingError: no prompt summary (the base model called directly).
        """
        if inputs.prompt_summary is None:
            raise RoutingError("OrchMoE routes from the prompt: call the RoutedModel, not its base model")
        pi = self.task_router(inputs.prompt_summary)  # (b, K)
        aux = None
        if self.balance_coef > 0 and self.training and torch.is_grad_enabled():
            aux = self.balance_coef * TaskRouter.balance_loss(pi)
        return Route(self.skill_router(pi), pi, aux)

    def allocation_parameters(self) -> list[nn.Parameter]:
        """``[W_skill]``: the Skill Router's logits, trained at ``router_lr`` (the Task Router is not)."""
        return [self.skill_router.logits]

    def allocation_matrices(self) -> torch.Tensor:
        """Evaluation-mode allocation per abstract task, (L, K, S)."""
        return self.skill_router.allocation()

    def fixed_weights(
        self, abstract_task: int | None = None, task_probs: torch.Tensor | None = None, **other
    ) -> torch.Tensor:
        """(L, 1, 1, S) for one abstract task, or for a given pi (1, K).

        Args:
            abstract_task: k in 0..K-1.
            task_probs: (1, K) pi of one prompt (`RoutedModel.fixed_weights` computes it from ``input_ids``).
            **other: must be empty.
        Returns:
            (L, 1, 1, S) evaluation-mode weights.
        Raises:
            RoutingError: not exactly one of the two, k out of range, or other arguments.
        """
        if other:
            raise RoutingError(f"OrchMoE export takes abstract_task=k or a prompt, not {sorted(other)}")
        K = self.skill_router.n_abstract_tasks
        if (abstract_task is None) == (task_probs is None):
            raise RoutingError(
                "exporting an OrchMoE adapter needs exactly one of abstract_task=k or input_ids=<one prompt>"
            )
        if abstract_task is not None:
            if isinstance(abstract_task, bool) or not isinstance(abstract_task, int) or not 0 <= abstract_task < K:
                raise RoutingError(f"abstract task {abstract_task!r} out of range: n_abstract_tasks={K}")
            task_probs = F.one_hot(torch.tensor([abstract_task]), K).float()
        alloc = self.skill_router.allocation()  # (L, K, S)
        return torch.einsum("bk,lks->lbs", task_probs.to(alloc), alloc).unsqueeze(2)  # (L, 1, 1, S)
