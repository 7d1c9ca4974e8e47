"""OrchMoE's Task Router: which abstract task a prompt belongs to, from the prompt alone."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PROMPT_NORMS = ("standardize", "layernorm", "none")


class TaskRouter(nn.Module):
    """pi(x) = softmax(norm(u(x)) W_task / tau) over K abstract tasks, one router per model.

    u(x) is the masked mean of the frozen input embeddings of the prompt. Most of it is
    shared by every prompt (the template, function words): on SmolLM2 the mean summary
    has ~4x the norm of a prompt's deviation from it, while 85-98% of that deviation is
    between tasks. ``prompt_norm="standardize"`` therefore centres and scales each feature
    with running statistics of the training prompts (buffers, saved with the adapter, not
    trained) before a parameter-free layer norm, so the router sees what tells tasks apart;
    ``"layernorm"`` only applies the layer norm, ``"none"`` neither.
    """

    def __init__(self, d_model: int, n_abstract_tasks: int, temperature: float = 1.0, hidden: int = 0,
                 hard: bool = False, prompt_norm: str = "standardize") -> None:
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
            self.register_buffer("summary_count", torch.zeros((), dtype=torch.long))  # long: .half() leaves it exact

    @torch.no_grad()
    def update_statistics(self, summary: torch.Tensor) -> None:
        """Fold a batch of summaries (b, d) into the running mean and variance (an exact
        cumulative average over every prompt seen in training, merged as Chan et al.).

        Under torch.distributed the batch statistics are those of the global batch (one
        all-gather of 2d+1 numbers per process), so every process routes with the same statistics."""
        u = summary.detach().float()  # (b, d)
        n = int(self.summary_count)
        mean, var = self.summary_mean.float(), self.summary_var.float()
        b, batch_mean, batch_var = self._batch_moments(u)
        if b == 0:
            return
        total = n + b
        delta = batch_mean - mean
        new_mean = mean + delta * (b / total)
        new_var = (var * n + batch_var * b + delta * delta * (n * b / total)) / total if n else batch_var
        self.summary_mean.copy_(new_mean)
        self.summary_var.copy_(new_var)
        self.summary_count.add_(b)

    @staticmethod
    def _batch_moments(u: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, biased variance) of the rows of u, over all processes when distributed."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return u.shape[0], u.mean(0), u.var(0, unbiased=False)
        local_mean = u.mean(0) if u.shape[0] else u.new_zeros(u.shape[1])
        centred = ((u - local_mean) ** 2).sum(0)  # (d,) sums around the local mean: no cancellation
        packed = torch.cat([u.new_tensor([float(u.shape[0])]), u.sum(0), centred])  # (2d+1,)
        world = [torch.zeros_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(world, packed)
        counts = torch.stack([w[0] for w in world])  # (W,)
        total = float(counts.sum())
        if total == 0:
            return 0, u.new_zeros(u.shape[1]), u.new_zeros(u.shape[1])
        d = u.shape[1]
        means = torch.stack([w[1:1 + d] / w[0].clamp_min(1) for w in world])  # (W, d)
        mean = (means * counts[:, None]).sum(0) / total
        m2 = torch.stack([w[1 + d:] for w in world]).sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
        return int(total), mean, m2 / total

    def normalized(self, summary: torch.Tensor) -> torch.Tensor:
        u = summary.float()  # (b, d)
        if self.prompt_norm == "standardize":
            if self.training:
                self.update_statistics(u)
            # before any statistics (mean 0, var 1) this is a uniform rescaling, which the layer norm undoes
            var = self.summary_var.float()
            u = (u - self.summary_mean.float()) * torch.rsqrt(var + 1e-3 * var.mean() + 1e-12)  # (b, d)
        if self.prompt_norm != "none":
            u = F.layer_norm(u, (self.d_model,))
        return u.to(next(self.parameters()).dtype)

    def logits(self, summary: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalized(summary)) / self.temperature  # (b, d) @ (d, K) -> (b, K)

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
