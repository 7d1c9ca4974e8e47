"""OrchMoE's Task Router: which abstract task a prompt belongs to, from the prompt alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskRouter(nn.Module):
    """pi(x) = softmax(u(x) W_task / tau) over K abstract tasks, one router per model.

    u(x) is the masked mean of the frozen input embeddings of the prompt; a
    parameter-free layer norm puts it on a scale the router can learn from
    whatever the embedding norm of the base model.
    """

    def __init__(self, d_model: int, n_abstract_tasks: int, temperature: float = 1.0, hidden: int = 0, hard: bool = False, normalize: bool = True) -> None:
        super().__init__()
        self.d_model, self.n_abstract_tasks = d_model, n_abstract_tasks
        self.temperature, self.hard, self.normalize = temperature, hard, normalize
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_abstract_tasks))
        else:
            self.net = nn.Linear(d_model, n_abstract_tasks)

    def logits(self, summary: torch.Tensor) -> torch.Tensor:
        u = summary.to(next(self.parameters()).dtype)  # (b, d)
        if self.normalize:
            u = F.layer_norm(u, (self.d_model,))
        return self.net(u) / self.temperature  # (b, d) @ (d, K) -> (b, K)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        logits = self.logits(summary)
        if self.hard:
            if self.training:
                return F.gumbel_softmax(logits, tau=1.0, hard=True)
            return F.one_hot(logits.argmax(-1), self.n_abstract_tasks).to(logits.dtype)
        return F.softmax(logits, dim=-1)  # (b, K)

    @staticmethod
    def balance_loss(pi: torch.Tensor) -> torch.Tensor:
        """K * sum_k mean(pi_k)^2: 1 when the batch spreads evenly, K when it collapses onto one task."""
        mean = pi.mean(0)
        return pi.shape[-1] * (mean * mean).sum()
