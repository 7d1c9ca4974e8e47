"""What a router is.

Two kinds, by what they read:

* a `ModelRouter` decides the allocation of every adapted layer at once, before the base model
  runs, from what is known of each example beforehand (nothing, its task id, its prompt). It
  returns one ``(L, b, h, S)`` tensor: parameter mixing (LoRA, Poly, MHR, OrchMoE). Computing all
  layers in one batched operation keeps the per-layer work to the mixing itself.
* a `LayerRouter` lives inside one adapted layer and gates each token from that layer's input:
  output mixing (MoLoRA, MoDE), ``(b, n, k, S)`` gates.

Both are built from their method's config (``from_config``) and registered with it
(:func:`orchmoe.core.registry.register_method`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orchmoe.core.routing import RoutingError

__all__ = ["ModelRouter", "LayerRouter", "Route", "RoutingInputs"]


@dataclass
class RoutingInputs:
    """What a model-level router may read about a batch (computed only when its method needs it)."""

    batch: int
    task_ids: torch.Tensor | None = None  # (b,) long, -1 for an unseen task
    prompt_summary: torch.Tensor | None = None  # (b, d) u(x), fp32


@dataclass
class Route:
    """A model-level routing decision for one batch."""

    weights: torch.Tensor | None  # (L, b, h, S) allocation of every layer; None: the single expert
    task_probs: torch.Tensor | None = None  # (b, K) OrchMoE's pi(x)
    aux_loss: torch.Tensor | None = None  # a training loss term (OrchMoE's balance term)


class ModelRouter(nn.Module):
    """Routes all adapted layers of a model at once (parameter mixing)."""

    mixing = "params"
    row_label = "task"  # what a row of the allocation matrix stands for

    def forward(self, inputs: RoutingInputs) -> Route:  # pragma: no cover - abstract
        """Route one batch: every adapted layer's allocation at once.

        Args:
            inputs: what the method needs of the batch (task ids, prompt summary).
        Returns:
            The `Route`: weights (L, b, h, S) or None, and OrchMoE's pi(x) and balance term.
        """
        raise NotImplementedError

    def allocation_parameters(self) -> list[nn.Parameter]:
        """Task-skill allocation logits: the parameters the references train at a much higher rate."""
        return []

    def allocation_matrices(self) -> torch.Tensor | None:
        """Evaluation-mode task-skill allocation of every layer, (L, rows, S); None without one."""
        return None

    def fixed_weights(self, **routing) -> torch.Tensor | None:
        """Evaluation-mode weights (L, 1, h, S) of one fixed routing (export, merge); None: one expert."""
        if routing:
            raise RoutingError(f"{type(self).__name__} takes no routing arguments, got {sorted(routing)}")
        return None


class LayerRouter(nn.Module):
    """Gates every token of one adapted layer from its input (output mixing).

    A router whose gates depend on x only through ``x @ W`` answers ``input_weight()`` (W, P x k*S):
    the layer then computes that product in the same GEMM as its down-projection and passes the
    logits to ``gates_from_logits``; any other router is called on x (``forward``).
    """

    mixing = "tokens"
    decoder_side = False  # set by the model on routers inside an encoder-decoder model's decoder

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:  # pragma: no cover - abstract
        """Gates of every token of the layer's input.

        Args:
            x: (b, n, P) the layer's (adapter) input.
            state: the model's `RoutingState` (padding mask, auxiliary losses), or None.
        Returns:
            (b, n, k, S) gates: for each of k rank blocks, weights over the S experts.
        """
        raise NotImplementedError

    def input_weight(self) -> torch.Tensor | None:
        """W (P, k*S) when the gates are a function of ``x @ W``; None otherwise."""
        return None

    def gates_from_logits(self, logits: torch.Tensor, state) -> torch.Tensor:  # pragma: no cover - abstract
        """Gates (b, n, k, S) from ``x @ input_weight()`` (b, n, k*S).

        Args:
            logits: (b, n, k*S), ``x @ input_weight()``.
            state: the model's `RoutingState`, or None.
        """
        raise NotImplementedError
