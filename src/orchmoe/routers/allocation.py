"""Allocation routers with parameter mixing: Poly / MHR (task id) and OrchMoE's Skill Router.

Both sample a relaxed Bernoulli over skills from learnable logits in training
(sigmoid in evaluation) and normalise each row, as Poly's reference code and
PEFT do; they differ only in how a row is chosen: the true task id (Poly) or a
convex mix of abstract-task rows by pi(x) (OrchMoE).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12


def relaxed_allocation(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """Gumbel-sigmoid sample (train) or sigmoid (eval), normalised over the last (skill) axis."""
    z = RelaxedBernoulli(temperature=torch.tensor(1.0, device=logits.device), logits=logits).rsample() if training else torch.sigmoid(logits)
    return z / (z.sum(dim=-1, keepdim=True) + EPS)


def _init_logits(n_rows: int, n_splits: int, n_skills: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(n_rows, n_splits * n_skills).uniform_(-1e-3, 1e-3))


class PolyRouter(nn.Module):
    """Task-skill logits Z (T x h*S), one row per training task (h = 1: Poly, h > 1: MHR)."""

    mixing = "params"

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int = 1) -> None:
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = n_tasks, n_skills, n_splits
        self.logits = _init_logits(n_tasks, n_splits, n_skills)

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:
        task_ids = state.task_ids_for(x.shape[0], "Poly/MHR routing").to(self.logits.device)  # (b,), -1 for an unseen task
        logits = self.logits[task_ids.clamp_min(0)].view(-1, self.n_splits, self.n_skills)  # (b, h, S)
        w = relaxed_allocation(logits, self.training)  # (b, h, S)
        unseen = task_ids < 0
        if unseen.any():  # no row for it: the mean evaluation-mode allocation of the training tasks
            mean = relaxed_allocation(self.logits.view(self.n_tasks, self.n_splits, self.n_skills), False).mean(0)  # (h, S)
            w = torch.where(unseen[:, None, None], mean, w)
        return w

    def allocation(self, task_id: int) -> torch.Tensor:
        """Evaluation-mode weights of one task, (h, S)."""
        return relaxed_allocation(self.logits[task_id].view(self.n_splits, self.n_skills), False)


class SkillRouter(nn.Module):
    """OrchMoE's per-layer task-skill allocation matrix W_skill (K x S).

    The allocation of an example is pi(x) @ Z_hat: a convex mix of abstract-task rows.
    """

    mixing = "params"

    def __init__(self, n_abstract_tasks: int, n_skills: int) -> None:
        super().__init__()
        self.n_abstract_tasks, self.n_skills = n_abstract_tasks, n_skills
        self.logits = _init_logits(n_abstract_tasks, 1, n_skills)

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:
        pi = state.task_probs_for(x.shape[0], "OrchMoE skill routing")  # (b, K)
        z = relaxed_allocation(self.logits, self.training)  # (K, S)
        return (pi.to(device=z.device, dtype=z.dtype) @ z).unsqueeze(1)  # (b, K) @ (K, S) -> (b, S) -> (b, 1, S)

    def allocation(self) -> torch.Tensor:
        """Evaluation-mode allocation matrix, (K, S): the rows the paper's Figure 3 clusters."""
        return relaxed_allocation(self.logits, False)
