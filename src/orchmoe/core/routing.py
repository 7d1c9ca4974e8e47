"""The routing context: what the adapted layers read, computed once per forward.

Every adapted layer holds a reference to one `RoutingState` owned by the model. Before the base
model runs, the model's router fills it: the allocation weights of every layer at once
(parameter mixing, ``(L, b, h, S)``), or the inputs the per-token routers need (the padding
mask). `generate()` keeps it fixed across decoding steps, so the KV cache stays valid. Beam
search and ``num_return_sequences`` repeat each example contiguously (``repeat_interleave``), so a
batch that is a multiple of the stored one is expanded that way.

Without gradients the parameter-mixing layers keep their mixed ``(A_t, B_t)`` here (``mixed``)
from the first forward of a routing (the prefill) to the next `set`, so decoding steps only read
tensors: nothing in a layer's forward depends on a Python value that changes from one routing to
the next, and ``torch.compile`` does not recompile per prompt batch.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RoutingState", "RoutingError", "checked_task_ids", "prompt_token_mask"]


class RoutingError(ValueError):
    """Routing inputs missing or inconsistent with the batch."""


class RoutingState:
    """The routing of the current prompt batch, shared by every adapted layer of a `RoutedModel`.

    The model fills it (`set`) before the base model runs; each layer reads its part, expanded to its own
    batch when beam search or ``num_return_sequences`` repeat every example.

    Attributes:
        task_ids: (b,) long task ids (Poly/MHR), or None.
        task_probs: (b, K) OrchMoE's pi(x), or None.
        weights: (L, b, h, S) allocation of every adapted layer (parameter mixing), or None.
        token_mask: (b, n) 1 for the real tokens of the (encoder) input, or None.
        decoder_token_mask: (b, m) real decoder tokens of an encoder-decoder model, or None.
        aux_losses: the auxiliary loss terms of the current forward (balance losses).
        mixed: layer index -> (A_t, B_t) mixed once per routing without gradients (decoding).
        ready: True once `set` has filled it.
    """

    def __init__(self) -> None:
        # layer index -> (A_t, B_t) mixed under this routing without gradients (decoding); cleared in place by
        # every set(), so a compiled decoding step reads tensors and never a key that changes with the routing
        self.mixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mixed_versions: dict[int, tuple[int, int]] = {}  # the experts' _version counters when mixed (eager check)
        self.clear()

    def clear(self) -> None:
        """Forget the routing, its cached expansions and the mixed weights (``mixed`` emptied in place)."""
        self.task_ids: torch.Tensor | None = None  # (b,) long
        self.task_probs: torch.Tensor | None = None  # (b, K) pi(x)
        self.weights: torch.Tensor | None = None  # (L, b, h, S) allocation of every layer
        self.token_mask: torch.Tensor | None = None  # (b, n) 1 for real tokens of the (encoder) input
        self.decoder_token_mask: torch.Tensor | None = None  # (b, m) real decoder tokens (encoder-decoder models)
        self.aux_losses: list[torch.Tensor] = []
        self.cache = None  # weakref to the KV cache this routing was set with (RoutedModel.forward)
        self._per_layer: dict[int, tuple[torch.Tensor, ...]] = {}
        self._expanded: dict[tuple, torch.Tensor] = {}  # per-batch expansions and derived masks
        self.mixed.clear()
        self.mixed_versions.clear()
        self.ready = False

    def set(self, *, task_ids=None, task_probs=None, weights=None, token_mask=None, decoder_token_mask=None) -> None:
        """Replace the routing with a new prompt batch's (everything else cleared).

        Args:
            task_ids: (b,) long task ids, -1 for an unseen task.
            task_probs: (b, K) pi(x) of OrchMoE's Task Router.
            weights: (L, b, h, S) allocation of every adapted layer; None when no model-level router mixes.
            token_mask: (b, n) attention mask of the (encoder) input.
            decoder_token_mask: (b, m) real decoder tokens (encoder-decoder models).
        """
        self.clear()
        self.task_ids = task_ids
        self.task_probs = task_probs
        self.weights = weights
        self.token_mask = token_mask
        self.decoder_token_mask = decoder_token_mask
        self.ready = True

    def _for_batch(self, name: str, value: torch.Tensor, batch: int, dim: int = 0) -> torch.Tensor:
        stored = value.shape[dim]
        if stored == batch:
            return value
        key = (name, batch)
        if key not in self._expanded:
            if batch % stored:
                raise RoutingError(f"batch of {batch} rows does not extend the routed batch of {stored} prompts")
            self._expanded[key] = value.repeat_interleave(batch // stored, dim=dim)
        return self._expanded[key]

    def layer_weights(self, index: int, batch: int) -> torch.Tensor | None:
        """Allocation weights (b, h, S) of adapted layer ``index``; None when nothing routes (LoRA).

        All layers' weights are unbound once per forward (one op, and one stack in the backward).

        Args:
            index: the layer's row of ``weights`` (`RoutedLoraLayer.index`).
            batch: the layer's batch; a multiple of the routed batch is expanded with ``repeat_interleave``.
        Returns:
            (batch, h, S), or None.
        Raises:
            RoutingError: ``batch`` is not a multiple of the routed batch.
        """
        if self.weights is None:
            return None
        if batch not in self._per_layer:
            self._per_layer[batch] = self._for_batch("weights", self.weights, batch, dim=1).unbind(0)
        return self._per_layer[batch][index]

    def task_probs_for(self, batch: int) -> torch.Tensor | None:
        """pi(x) expanded to ``batch`` rows as `layer_weights` expands, (batch, K); None without a Task Router."""
        return None if self.task_probs is None else self._for_batch("task_probs", self.task_probs, batch)

    def token_mask_for(self, shape: torch.Size, decoder: bool = False) -> torch.Tensor | None:
        """The padding mask when it describes these (b, n) tokens; ``decoder``: a layer of an
        encoder-decoder model's decoder, whose tokens are not those of the input mask.

        Args:
            shape: (b, n): batch and length of the layer's tokens.
            decoder: read the decoder's mask instead of the input's.
        Returns:
            The (b, n) mask, expanded to b rows; None when there is none, its length is not n or b is not a
            multiple of its rows.
        """
        name = "decoder_token_mask" if decoder else "token_mask"
        m = getattr(self, name)
        if m is None or m.dim() != 2 or m.shape[1] != shape[1] or shape[0] % m.shape[0]:
            return None
        return self._for_batch(name, m, shape[0])

    def token_weights_for(
        self, shape: torch.Size, decoder: bool = False, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor | None:
        """The padding mask of these (b, n) tokens as weights summing to one over the real tokens, (b, n, 1, 1);
        computed once per forward and shared by every layer's balance loss. None without a matching mask.

        Args:
            shape, decoder: as `token_mask_for`.
            dtype: the weights' dtype.
        """
        m = self.token_mask_for(shape, decoder)
        if m is None:
            return None
        key = ("token_weights", decoder, tuple(shape), dtype)
        if key not in self._expanded:
            w = m.to(dtype)
            self._expanded[key] = (w / w.sum().clamp_min(1.0)).view(*w.shape, 1, 1)
        return self._expanded[key]

    def add_aux_loss(self, loss: torch.Tensor) -> None:
        """Record an auxiliary loss term (a scalar with its graph): the forward's output carries their sum."""
        self.aux_losses.append(loss)


def prompt_token_mask(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, shape, device) -> torch.Tensor:
    """Which tokens are the prompt: attended tokens without a label (the answer carries labels).

    The one rule for it (the model's routing and the recipe's answer window use it). ``labels``
    only for decoder-only batches whose labels align with the tokens; a row where every token is
    labelled (plain language modelling) counts every attended token as prompt.

    Args:
        attention_mask: (b, n), or None: every token attended.
        labels: (b, n) with -100 on unlabelled tokens, or None; ignored when its shape is not the mask's.
        shape: (b, n) of the batch, for a mask of ones when ``attention_mask`` is None.
        device: where that mask of ones is made.
    Returns:
        (b, n) prompt-token mask: bool, or the attention mask (ones without one) itself when ``labels`` is
        None or not shaped like it.
    """
    mask = attention_mask if attention_mask is not None else torch.ones(tuple(shape), dtype=torch.long, device=device)
    if labels is None or labels.shape != mask.shape:
        return mask
    prompt = mask.bool() & (labels == -100)
    empty = ~prompt.any(dim=1, keepdim=True)
    return torch.where(empty, mask.bool(), prompt)


def checked_task_ids(cfg: Any, task_ids: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """``task_ids`` as a (b,) long tensor on ``device`` after the checks a method's routing needs.

    Args:
        cfg: the adapter's config (``method``, ``needs_task_ids``, ``n_tasks``).
        task_ids: what the caller passed: None, a list, or a tensor of shape (b,) or (b, 1).
        batch: b, the batch size.
        device: where the ids are used.
    Returns:
        The ids, or None for a method that does not route by task id.
    Raises:
        RoutingError: ids missing for Poly/MHR, given to a method that ignores them, not integers, of the
            wrong shape or count, or out of range (checked on the host when they are there; on a device with
            an asynchronous assert, so no host sync).
    """
    if task_ids is None:
        if cfg.needs_task_ids:
            raise RoutingError(
                f"{cfg.method} routes by task id: pass task_ids=... (one per example) to forward()/generate(). "
                "Through a peft.PeftModelForCausalLM built by a bare peft.get_peft_model, call "
                "orchmoe.accept_task_ids(model) first: PEFT's forward hands task_ids only to its own Poly"
            )
        return None
    if not cfg.needs_task_ids:
        raise RoutingError(f"{cfg.method} does not route by task id: drop task_ids (they would be ignored)")
    try:
        ids = torch.as_tensor(task_ids)
    except (TypeError, ValueError, RuntimeError):  # a string, a ragged list, objects
        raise RoutingError(
            f"task_ids must be integers (a list or tensor, one per example), got {type(task_ids).__name__} "
            f"{task_ids!r:.60}"
        ) from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise RoutingError(f"task_ids must be integers, got {ids.dtype}")
    if ids.dim() > 1 and not (ids.dim() == 2 and ids.shape[1] == 1):
        raise RoutingError(f"task_ids must be one id per example, shape ({batch},); got {tuple(ids.shape)}")
    ids = ids.to(torch.long).reshape(-1)
    if ids.numel() != batch:
        raise RoutingError(f"got {ids.numel()} task_ids for a batch of {batch}")
    n_tasks = cfg.n_tasks
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():  # on the host for free; else no sync
        bad = ids[(ids < -1) | (ids >= n_tasks)]
        if bad.numel():
            raise RoutingError(
                f"task id {int(bad[0])} out of range: this {cfg.method} adapter has n_tasks={n_tasks} "
                f"(ids 0..{n_tasks - 1}, or -1 for an unseen task)"
            )
    else:
        torch._assert_async(((ids >= -1) & (ids < n_tasks)).all(), "task id out of range")
    return ids.to(device, non_blocking=True)
