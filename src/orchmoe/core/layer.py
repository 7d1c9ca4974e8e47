"""The one mixture-of-low-rank-experts layer every method uses.

A frozen base projection ``y = x W0`` plus ``scale * delta(x)`` where delta is a
mixture of S low-rank experts ``A_s (P x r)``, ``B_s (r x Q)``; ``A`` may be shared
by all experts (MoDE, MoLoRA-SD). The router decides the mixture:

* parameter mixing (LoRA, Poly, MHR, OrchMoE): per-example weights w (b, h, S)
  build ``A_t = sum_s w_s A_s`` and ``B_t = sum_s w_s B_s`` (h blocks of the input
  rows of A / output columns of B routed separately for MHR);
* output mixing (MoLoRA, MoDE): per-token gates g (b, n, k, S) scale each
  expert's block of p = r/k rank columns between ``x @ A`` and ``@ B``.

Both are two matrix products whatever S is: no Python loop over experts. The second
product also adds the scaled update to the base output (``addmm``/``baddbmm`` with
``alpha=scale``), and a linear token router shares the first one (``x @ [A | W_g]``):
on an accelerator a small model is launch-bound, so operators count, not FLOPs
(``benchmarks/ops_count.py``). Nothing in a forward reads a tensor on the host.

Precision: without autocast, fp32 adapters on a bf16 base compute the update in fp32
(the activations are cast once, the sum rounded once); under autocast nothing is cast,
autocast runs the products in its own dtype. Without gradients (generation) the mixed
``(A_t, B_t)`` of a routing are built once and then read from the `RoutingState`, so a
compiled decoding step does not recompile for a new prompt batch.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from orchmoe.core.routing import RoutingError

try:  # GPT-2 style (in, out) weights
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always present in practice
    Conv1D = ()  # type: ignore[assignment]

__all__ = ["RoutedLoraLayer", "layer_shape", "is_adaptable"]


def is_adaptable(module: nn.Module) -> bool:
    """Whether ``module`` can carry routed experts: an ``nn.Linear`` or a transformers (GPT-2) ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(P, Q): input and output width of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and transformers Conv1D are supported")


class RoutedLoraLayer(nn.Module, BaseTunerLayer):
    """Wraps a frozen ``nn.Linear`` / ``Conv1D``; expert weights are parameters of this leaf module.

    A PEFT tuner layer (`peft.tuners.tuners_utils.BaseTunerLayer`), so PEFT's model status and
    ``disable_adapter()`` see it; it holds one adapter, as plain parameters rather than per-name dicts
    (``adapter_layer_names`` is empty: orchmoe's tuner saves, loads and freezes them itself).

    ``lora_A`` is (D, P, r), D = 1 when the experts share it, else S; ``lora_B`` is (S, r, Q), zero at first,
    so the layer starts as its base layer. `RoutedModel` builds the layers and sets their ``state``.

    Args:
        base_layer: the frozen layer, P inputs and Q outputs (experts and router are put on its device).
        n_experts: S, the number of experts (skills).
        rank: r, the rank of each expert.
        scale: the update's factor (``alpha / rank``).
        router: a per-token `LayerRouter` (output mixing: MoLoRA, MoDE); None: the model's routing.
        shared_down: one down-projection A for every expert (MoDE, MoLoRA-SD).
        n_splits: h routing blocks of A's rows and B's columns (MHR); must divide P and Q.
        dropout: dropout on the adapter's input.
        index: this layer's row in the model's routing weights.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        n_experts: int,
        rank: int,
        scale: float,
        router: nn.Module | None = None,
        shared_down: bool = False,
        n_splits: int = 1,
        dropout: float = 0.0,
        index: int = 0,
    ) -> None:
        super().__init__()
        P, Q = layer_shape(base_layer)
        if P % n_splits or Q % n_splits:
            raise ValueError(
                f"n_splits={n_splits} must divide both the input ({P}) and output ({Q}) width of the layer"
            )
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
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def disabled(self) -> bool:
        """Whether the layer computes its base layer alone (``PeftModel.disable_adapter()``)."""
        return self._disable_adapters

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch: the routed update on (True) or off."""
        self._disable_adapters = not enabled

    # Model code reads these from the layer it called (T5's `self.wo.weight.dtype`, quantisation checks):
    # the wrapped layer answers for the base weights, as a PEFT tuner layer does.
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one)."""
        return self.base_layer.bias

    def extra_repr(self) -> str:
        """The sizes shown in the module's repr."""
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, rank={self.rank}, "
            f"shared_down={self.shared_down}, splits={self.n_splits}, scale={self.scale:g}"
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus ``scale`` times the routed update (the base output alone when ``disabled``).

        Args:
            x: (b, n, P) input; parameter mixing reads a 2-D (n, P) input as one example's tokens.
            *args, **kwargs: passed to the base layer.
        Returns:
            (b, n, Q), shaped and typed like the base layer's output.
        Raises:
            RoutingError: the layer mixes several experts and no routing was set (the base model called directly).
        """
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        h = self.dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)  # fp32 adapters on a bf16 base: the update in fp32 (autocast picks its own)
        if self.router is not None:
            return self.mix_outputs(h, result)
        batch = h.shape[0] if h.dim() > 2 else 1
        if self.state is None or self.state.weights is None:
            self.allocation(batch)  # a mixture without routing: a clear error
            return _add_product(result, h.reshape(-1, self.in_features) @ self.lora_A[0], self.lora_B[0], self.scale)
        A_t, B_t = self.routed_weights(batch)
        return self.mix_parameters(h, result, A_t, B_t)

    def mixed_weights(self, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (A_t, B_t), (b, P, r) and (b, r, Q), from allocation weights w (b, h, S).

        Args:
            w: (b, h, S) allocation weights (each block's row sums to one); None: the single expert.
        Returns:
            (A_t, B_t), (b, P, r) and (b, r, Q); for ``w=None`` ``lora_A`` and ``lora_B`` themselves, (1, P, r)
            and (1, r, Q) for a single expert, broadcast over the batch.
        """
        A, B = self.lora_A, self.lora_B  # (S, P, r), (S, r, Q)
        if w is None:
            return A, B  # (1, P, r), (1, r, Q): broadcast over the batch
        S, P, r = A.shape
        Q, h, b = self.out_features, self.n_splits, w.shape[0]
        w = w.to(A.dtype)
        if h == 1:  # one GEMM per factor
            w = w.reshape(b, S)
            return (w @ A.view(S, P * r)).view(b, P, r), (w @ B.view(S, r * Q)).view(
                b, r, Q
            )  # (b,S)@(S,P*r), (b,S)@(S,r*Q)
        # MHR: block j of A's rows and of B's columns mixed by w[:, j]. A broadcast product and one sum each, laid
        # out so that the results are already (b, P, r) and (b, r, Q) and the experts' gradients need no copy
        w = w.transpose(1, 2).unsqueeze(-1)  # (b,S,h,1)
        A_t = (w * A.view(S, h, P // h * r)).sum(1)  # (b,S,h,1)*(S,h,P/h*r) -> (b,h,P/h*r)
        B_t = (w.unsqueeze(2) * B.view(S, r, h, Q // h)).sum(1)  # (b,S,1,h,1)*(S,r,h,Q/h) -> (b,r,h,Q/h)
        return A_t.reshape(b, P, r), B_t.reshape(b, r, Q)

    def allocation(self, batch: int) -> torch.Tensor | None:
        """This layer's allocation weights (b, h, S) from the model's routing; None for a single expert.

        Raises:
            RoutingError: the layer mixes several experts (or MHR blocks) and no routing was set.
        """
        w = self.state.layer_weights(self.index, batch) if self.state is not None else None
        if w is None and (self.n_experts > 1 or self.n_splits > 1):
            raise RoutingError(
                "this layer mixes several experts but no routing was set for this forward: "
                "call the RoutedModel, not its base model"
            )
        return w

    def routed_weights(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, B_t) for this batch. Without gradients the routing is fixed until the next `RoutingState.set`
        (a generate() call, every decoding step of it), so the mixed weights are built once, at the first
        forward of that batch size (the prefill), kept in the state and then only read: a compiled decoding
        step sees tensors, never a Python key that changes with the routing. In eager mode an in-place change
        of the experts (an optimizer step between forwards) rebuilds them.

        Args:
            batch: rows of this forward's input (a multiple of the routed batch).
        Returns:
            (A_t, B_t), (batch, P, r) and (batch, r, Q) (see `mixed_weights`).
        """
        state = self.state
        if torch.is_grad_enabled():
            return self.mixed_weights(self.allocation(batch))
        cached = state.mixed.get(self.index)
        if (
            cached is None
            or cached[0].shape[0] != batch
            or (not torch.compiler.is_compiling() and state.mixed_versions.get(self.index) != self._versions())
        ):
            cached = self.mixed_weights(self.allocation(batch))
            state.mixed[self.index] = cached
            state.mixed_versions[self.index] = self._versions()
        return cached

    def _versions(self) -> tuple[int, int]:
        return self.lora_A._version, self.lora_B._version

    def mix_parameters(
        self, h: torch.Tensor, result: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor
    ) -> torch.Tensor:
        """result + scale * (h @ A_t) @ B_t, one (A_t, B_t) per example: two batched GEMMs, the second also
        adding the scaled update to the base output.

        Args:
            h: (b, n, P) adapter input (any other shape is viewed as (b, -1, P)).
            result: the base layer's output for it, (b, n, Q).
            A_t: (b, P, r) mixed down-projections; (1, P, r): one pair for every row.
            B_t: (b, r, Q) mixed up-projections, or (1, r, Q).
        Returns:
            ``result`` plus the update, same shape and dtype.
        """
        b, P, _ = A_t.shape
        if A_t.shape[0] == 1:  # one pair for every row (export's single routing)
            return _add_product(result, h.reshape(-1, P) @ A_t[0], B_t[0], self.scale)
        if h.dim() != 3:
            return self.mix_parameters(h.reshape(b, -1, P), result.reshape(b, -1, self.out_features), A_t, B_t).view(
                result.shape
            )
        return _add_product(result, torch.bmm(h, A_t), B_t, self.scale)  # (b,n,P)@(b,P,r) -> (b,n,r); @(b,r,Q)

    def mix_outputs(self, h: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Per-token gates scale each expert's block of rank columns between ``h @ A`` and ``@ B``. When the
        router is linear in h (MoLoRA, MoDE) its product shares the down-projection's GEMM.

        Args:
            h: (b, n, P) adapter input.
            result: the base layer's output for it, (b, n, Q).
        Returns:
            ``result`` plus the gated update, same shape and dtype.
        """
        A, B = self.lora_A, self.lora_B  # (D, P, r) with D in {1, S}; (S, r, Q)
        D, P, r = A.shape
        S, Q = B.shape[0], self.out_features
        x = h.reshape(-1, P)  # (N, P)
        shape = h.shape[:-1]
        down = [A[0]] if D == 1 else list(A.unbind(0))  # D blocks (P, r) of the down-projection
        router_weight = self.router.input_weight()
        if router_weight is None:
            z = x @ (down[0] if D == 1 else torch.cat(down, 1))  # (N,P)@(P,D*r) -> (N,D*r)
            gates = self.router(h, self.state)
        else:
            W = torch.cat([*down, router_weight.to(A.dtype)], 1)  # (P, D*r + k*S)
            z, logits = (x @ W).split([D * r, router_weight.shape[1]], -1)  # (N,P)@(P,D*r+k*S) -> (N,D*r), (N,k*S)
            gates = self.router.gates_from_logits(logits.view(*shape, -1), self.state)
        k = gates.shape[-2]  # rank blocks, each of p = r // k columns
        u = z.view(-1, D, k, r // k) * gates.reshape(-1, k, S).transpose(1, 2).unsqueeze(
            -1
        )  # (N,D,k,p)*(N,S,k,1) -> (N,S,k,p)
        return _add_product(result, u.reshape(-1, S * r), B.view(S * r, Q), self.scale)  # (N,S*r)@(S*r,Q)

    def delta_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The merged update for one routing (parameter-mixing methods), (P, Q), scale included.

        Args:
            w: (1, h, S) allocation of that routing (`RoutedModel.fixed_weights`); None: the single expert.
        Returns:
            (P, Q), applied as ``x @ delta`` (an ``nn.Linear`` weight takes its transpose).
        Raises:
            ValueError: a per-token routed layer (MoLoRA/MoDE) has no single update.
        """
        if self.router is not None:
            raise ValueError("a per-token routed layer (MoLoRA/MoDE) has no single weight update to merge")
        A_t, B_t = self.mixed_weights(w)
        return self.scale * (A_t[0] @ B_t[0])  # (P,r)@(r,Q) -> (P,Q)


def _add_product(result: torch.Tensor, z: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + scale * z @ B`` as one (batched) GEMM, shaped like ``result``.

    z is (N, r) with B (r, Q), rows flattened from result's; or (b, n, r) with B (b, r, Q). The scale and
    the residual add are folded into the GEMM (``addmm``/``baddbmm`` with ``alpha``). Under autocast the
    GEMM runs in the autocast dtype; without it, an update in another dtype than the base output (fp32
    adapters on a bf16 base) is added in the update's dtype and rounded once.
    """
    acc = result
    if result.dtype != z.dtype and not torch.is_autocast_enabled(z.device.type):
        acc = result.to(z.dtype)
    if z.dim() == 2:
        out = torch.addmm(acc.reshape(-1, B.shape[-1]), z, B, alpha=scale).view(result.shape)  # (N,r)@(r,Q)
    else:
        out = torch.baddbmm(acc, z, B, alpha=scale)  # (b,n,r)@(b,r,Q) -> (b,n,Q)
    return out.to(result.dtype)
