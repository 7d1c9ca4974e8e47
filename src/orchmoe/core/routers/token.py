"""Per-token softmax routers with output mixing: MoLoRA (one block) and MoDE (r/p blocks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchmoe.core.config import MoDEConfig, MoLoRAConfig
from orchmoe.core.registry import register_method
from orchmoe.core.routers.base import LayerRouter

__all__ = ["TokenRouter"]


@register_method(MoLoRAConfig)
@register_method(MoDEConfig)
class TokenRouter(LayerRouter):
    """Gates g (b, n, k, S): for each of k rank blocks a softmax over S experts.

    MoLoRA is k = 1 (W_g: P x S); MoDE has one router per block of p rank columns
    (W_R: P x k*m), computed as one matrix product. With top-k the kept gates are
    renormalised; every expert still takes part in the (dense) product, so each
    parameter receives a gradient every step and DDP needs no unused-parameter search.

    Args:
        in_features: P, the layer's input width.
        n_experts: S (MoLoRA) or m (MoDE), the experts per block.
        n_blocks: k, the rank blocks routed separately (MoDE's r / p; 1 for MoLoRA).
        top_k: keep this many experts per token and block (renormalised); None: all.
        aux_loss_coef: weight of the Switch load-balancing loss added in training (0: none).
    """

    def __init__(
        self, in_features: int, n_experts: int, n_blocks: int = 1, top_k: int | None = None, aux_loss_coef: float = 0.0
    ) -> None:
        super().__init__()
        self.n_experts, self.n_blocks, self.top_k, self.aux_loss_coef = n_experts, n_blocks, top_k, aux_loss_coef
        self.weight = nn.Parameter(torch.empty(in_features, n_blocks * n_experts))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    @classmethod
    def from_config(cls, config: MoLoRAConfig | MoDEConfig, in_features: int) -> TokenRouter:
        """The router of one layer of a `MoLoRAConfig` / `MoDEConfig`.

        Args:
            config: its ``n_skills``, ``n_blocks`` and (MoLoRA only) ``top_k``, ``aux_loss_coef`` set the router.
            in_features: P, the layer's input width.
        """
        return cls(
            in_features,
            config.n_skills,
            config.n_blocks,
            getattr(config, "top_k", None),
            getattr(config, "aux_loss_coef", 0.0),
        )

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:
        """Gates of the tokens of x, computed from ``x @ W_g``.

        Args:
            x: (b, n, P) the layer's (adapter) input.
            state: the model's `RoutingState`, as `gates_from_logits`.
        Returns:
            (b, n, k, S) gates.
        """
        return self.gates_from_logits(x @ self.weight.to(x.dtype), state)  # (b,n,P)@(P,k*S) -> (b,n,k*S)

    def input_weight(self) -> torch.Tensor:
        """W_g (P, k*S): the gates are a function of ``x @ W_g``, so the layer fuses it with its down-projection."""
        return self.weight

    def gates_from_logits(self, logits: torch.Tensor, state) -> torch.Tensor:
        """Gates (b, n, k, S) from the router's logits (b, n, k*S); adds the balance loss in training.

        Args:
            logits: (b, n, k*S) router logits, ``x @ W_g``.
            state: the model's `RoutingState`: its padding mask weights the balance loss, which is added to it;
                None: no balance loss.
        Returns:
            (b, n, k, S) gates in the logits' dtype: a softmax over S per block (top-k kept and renormalised).
        """
        probs = F.softmax(logits.unflatten(-1, (self.n_blocks, self.n_experts)).float(), dim=-1)  # (b,n,k,S)
        gates, top = probs, None
        if self.top_k is not None and self.top_k < self.n_experts:
            kept, top = probs.topk(self.top_k, dim=-1)  # (b,n,k,top_k)
            gates = torch.zeros_like(probs).scatter(-1, top, kept)
            gates = gates / gates.sum(-1, keepdim=True)
        if self.training and self.aux_loss_coef > 0 and torch.is_grad_enabled() and state is not None:
            weights = state.token_weights_for(probs.shape[:2], decoder=self.decoder_side, dtype=probs.dtype)
            state.add_aux_loss(self._balance(probs, weights, top, self.aux_loss_coef))
        return gates.to(logits.dtype)

    def balance_loss(
        self, probs: torch.Tensor, mask: torch.Tensor | None, top: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Switch load balancing S * sum_s f_s P_s, f the share of token selections, P the mean probability.

        Args:
            probs: router probabilities (b, n, k, S).
            mask: (b, n) 1 for the tokens that count (padding excluded), or None for all.
            top: the indices of the chosen experts when the gates already picked them (top-k routing).
        Returns:
            The loss (a scalar tensor), not multiplied by ``aux_loss_coef``.
        """
        weights = None
        if mask is not None:
            w = mask.to(device=probs.device, dtype=probs.dtype)
            weights = (w / w.sum().clamp_min(1.0)).view(*w.shape, 1, 1)
        return self._balance(probs, weights, top)

    def _balance(
        self, probs: torch.Tensor, weights: torch.Tensor | None, top: torch.Tensor | None, coef: float = 1.0
    ) -> torch.Tensor:
        """coef * the balance loss; ``weights`` (b, n, 1, 1) sum to one over the tokens that count."""
        k = self.top_k or 1
        if top is None or top.shape[-1] != k:
            top = probs.topk(k, dim=-1).indices  # (b,n,k,top_k)
        chosen = torch.zeros_like(probs).scatter_(-1, top, 1.0)  # (b,n,k,S), 1 where chosen (one_hot would sync on CPU)
        if weights is None:
            f, p = chosen.mean((0, 1, 2)), probs.mean((0, 1, 2))  # (S,)
        else:
            f, p = (chosen * weights).sum((0, 1, 2)), (probs * weights).sum((0, 1, 2))  # (S,), over n_blocks too
            coef = coef / (self.n_blocks * self.n_blocks)
        return (coef * self.n_experts / k) * (f * p).sum()
