"""Per-token softmax routers with output mixing: MoLoRA (one block) and MoDE (r/p blocks)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoDEConfig, MoLoRAConfig
from ..registry import register_method
from .base import LayerRouter

__all__ = ["TokenRouter"]


@register_method(MoLoRAConfig)
@register_method(MoDEConfig)
class TokenRouter(LayerRouter):
    """Gates g (b, n, k, S): for each of k rank blocks a softmax over S experts.

    MoLoRA is k = 1 (W_g: P x S); MoDE has one router per block of p rank columns
    (W_R: P x k*m), computed as one matrix product. With top-k the kept gates are
    renormalised; every expert still takes part in the (dense) product, so each
    parameter receives a gradient every step and DDP needs no unused-parameter search.
    """

    def __init__(self, in_features: int, n_experts: int, n_blocks: int = 1, top_k: int | None = None,
                 aux_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.n_experts, self.n_blocks, self.top_k, self.aux_loss_coef = n_experts, n_blocks, top_k, aux_loss_coef
        self.weight = nn.Parameter(torch.empty(in_features, n_blocks * n_experts))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    @classmethod
    def from_config(cls, config: MoLoRAConfig | MoDEConfig, in_features: int) -> "TokenRouter":
        return cls(in_features, config.n_skills, config.n_blocks, getattr(config, "top_k", None),
                   getattr(config, "aux_loss_coef", 0.0))

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:
        logits = (x @ self.weight.to(x.dtype)).unflatten(-1, (self.n_blocks, self.n_experts))  # (b,n,P)@(P,k*S) -> (b,n,k,S)
        probs = F.softmax(logits.float(), dim=-1)
        gates = probs
        if self.top_k is not None and self.top_k < self.n_experts:
            top, idx = probs.topk(self.top_k, dim=-1)  # (b,n,k,top_k)
            gates = torch.zeros_like(probs).scatter(-1, idx, top)
            gates = gates / gates.sum(-1, keepdim=True)
        if self.training and self.aux_loss_coef > 0 and torch.is_grad_enabled() and state is not None:
            state.add_aux_loss(self.aux_loss_coef * self.balance_loss(probs, state.token_mask_for(x.shape, decoder=self.decoder_side)))
        return gates.to(x.dtype)

    def balance_loss(self, probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Switch load balancing S * sum_s f_s P_s, f the share of token selections, P the mean probability."""
        k = self.top_k or 1
        chosen = F.one_hot(probs.topk(k, dim=-1).indices, self.n_experts).sum(-2).to(probs.dtype)  # (b,n,k,S)
        if mask is not None:
            w = mask.to(device=probs.device, dtype=probs.dtype)[..., None, None]  # (b,n,1,1)
            denom = w.sum().clamp_min(1.0) * self.n_blocks
            f = (chosen * w).sum((0, 1, 2)) / (denom * k)  # (S,)
            p = (probs * w).sum((0, 1, 2)) / denom
        else:
            f = chosen.mean((0, 1, 2)) / k
            p = probs.mean((0, 1, 2))
        return self.n_experts * (f * p).sum()
