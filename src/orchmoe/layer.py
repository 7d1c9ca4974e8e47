"""The one mixture-of-low-rank-experts layer every method uses.

A frozen base projection ``y = x W0`` plus ``scale * delta(x)`` where delta is a
mixture of S low-rank experts ``A_s (P x r)``, ``B_s (r x Q)``; ``A`` may be shared
by all experts (MoDE, MoLoRA-SD). The router decides the mixture:

* parameter mixing (LoRA, Poly, MHR, OrchMoE): per-example weights w (b, h, S)
  build ``A_t = sum_s w_s A_s`` and ``B_t = sum_s w_s B_s`` (h blocks of the input
  rows of A / output columns of B routed separately for MHR);
* output mixing (MoLoRA, MoDE): per-token gates g (b, n, k, S) scale each
  expert's block of p = r/k rank columns between ``x @ A`` and ``@ B``.

Both are two matrix products whatever S is: no Python loop over experts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .routing import RoutingError

try:  # GPT-2 style (in, out) weights
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always present in practice
    Conv1D = ()  # type: ignore[assignment]

__all__ = ["RoutedLoraLayer", "layer_shape", "is_adaptable"]


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(P, Q): input and output width of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and transformers Conv1D are supported")


class RoutedLoraLayer(nn.Module):
    """Wraps a frozen ``nn.Linear`` / ``Conv1D``; expert weights are parameters of this leaf module."""

    def __init__(self, base_layer: nn.Module, *, n_experts: int, rank: int, scale: float, router: nn.Module | None = None,
                 shared_down: bool = False, n_splits: int = 1, dropout: float = 0.0, index: int = 0) -> None:
        super().__init__()
        P, Q = layer_shape(base_layer)
        if P % n_splits or Q % n_splits:
            raise ValueError(f"n_splits={n_splits} must divide both the input ({P}) and output ({Q}) width of the layer")
        self.base_layer = base_layer
        self.in_features, self.out_features = P, Q
        self.n_experts, self.rank, self.scale, self.n_splits = n_experts, rank, scale, n_splits
        self.shared_down, self.index = shared_down, index  # index: this layer's row in the model's routing
        device = next(base_layer.parameters()).device  # experts and router live with the base weights (fp32 by default)
        self.router = router.to(device) if router is not None else None  # a per-token router (output mixing)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(1 if shared_down else n_experts, P, rank, device=device))  # (D, P, r)
        self.lora_B = nn.Parameter(torch.zeros(n_experts, rank, Q, device=device))  # (S, r, Q)
        bound = 1.0 / math.sqrt(P)  # kaiming_uniform(a=sqrt(5)) on (r, P), as LoRA and Poly initialise A
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.state = None  # the model's RoutingState; set by the model, not a submodule
        self.disabled = False

    # Model code reads these from the layer it called (T5's `self.wo.weight.dtype`, quantisation checks):
    # the wrapped layer answers for the base weights, as a PEFT tuner layer does.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, rank={self.rank}, "
                f"shared_down={self.shared_down}, splits={self.n_splits}, scale={self.scale:g}")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        squeeze = x.dim() == 2
        h = self.dropout(x.unsqueeze(0) if squeeze else x).to(self.lora_A.dtype)  # (b, n, P)
        if self.router is not None:
            delta = self.mix_outputs(h, self.router(h, self.state))
        else:
            delta = self.mix_parameters(h, *self.routed_weights(h))
        if squeeze:
            delta = delta.squeeze(0)
        return result + (self.scale * delta).to(result.dtype)

    def mixed_weights(self, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (A_t, B_t) from allocation weights w (b, h, S); None means the single expert."""
        A, B = self.lora_A, self.lora_B  # (S, P, r), (S, r, Q)
        if w is None:
            return A, B  # (1, P, r), (1, r, Q): broadcast over the batch
        S, P, r = A.shape
        Q, h = self.out_features, self.n_splits
        w = w.to(A.dtype)
        A_t = torch.einsum("bhs,shpr->bhpr", w, A.view(S, h, P // h, r)).reshape(-1, P, r)  # (b,h,S)x(S,h,P/h,r) -> (b,P,r)
        B_t = torch.einsum("bhs,srhq->brhq", w, B.view(S, r, h, Q // h)).reshape(-1, r, Q)  # (b,h,S)x(S,r,h,Q/h) -> (b,r,Q)
        return A_t, B_t

    def allocation(self, batch: int) -> torch.Tensor | None:
        """This layer's allocation weights (b, h, S) from the model's routing; None for a single expert."""
        w = self.state.layer_weights(self.index, batch) if self.state is not None else None
        if w is None and (self.n_experts > 1 or self.n_splits > 1):
            raise RoutingError("this layer mixes several experts but no routing was set for this forward: "
                               "call the RoutedModel, not its base model")
        return w

    def routed_weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, B_t) for this batch. While decoding (no grad, routers in eval mode) the routing is
        fixed per prompt batch, so the mixed weights are kept until the routing or a weight changes
        instead of being rebuilt at every step."""
        b = h.shape[0]
        if torch.is_grad_enabled() or self.state is None:
            return self.mixed_weights(self.allocation(b))
        key = (self.state.version, b, self.lora_A._version, self.lora_B._version)
        cache = getattr(self, "_decode_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, self.mixed_weights(self.allocation(b)))
            self._decode_cache = cache
        return cache[1]

    @staticmethod
    def mix_parameters(x: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor) -> torch.Tensor:
        if A_t.shape[0] == 1:  # one (A, B) for the whole batch
            return (x @ A_t[0]) @ B_t[0]  # (b,n,P)@(P,r) -> (b,n,r) @ (r,Q) -> (b,n,Q)
        return (x @ A_t) @ B_t  # (b,n,P)@(b,P,r) -> (b,n,r) @ (b,r,Q) -> (b,n,Q)

    def mix_outputs(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B  # (D, P, r) with D in {1, S}; (S, r, Q)
        D, P, r = A.shape
        S = B.shape[0]
        k = gates.shape[-2]  # rank blocks, each of p = r // k columns
        b, n = x.shape[:2]
        z = x @ A.permute(1, 0, 2).reshape(P, D * r)  # (b,n,P)@(P,D*r) -> (b,n,D*r)
        z = z.view(b, n, D, k, r // k) * gates.transpose(-1, -2).unsqueeze(-1)  # (b,n,D,k,p)*(b,n,S,k,1) -> (b,n,S,k,p)
        return z.reshape(b, n, S * r) @ B.reshape(S * r, self.out_features)  # (b,n,S*r)@(S*r,Q) -> (b,n,Q)

    def delta_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The merged update for one routing (parameter-mixing methods), (P, Q), scale included."""
        if self.router is not None:
            raise ValueError("a per-token routed layer (MoLoRA/MoDE) has no single weight update to merge")
        A_t, B_t = self.mixed_weights(w)
        return self.scale * (A_t[0] @ B_t[0])  # (P,r)@(r,Q) -> (P,Q)
