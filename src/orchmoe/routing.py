"""The routing context: what the routers read, computed once per forward.

Every adapted layer holds a reference to one `RoutingState` owned by the model.
The model fills it from the prompt (task ids, abstract-task distribution pi,
token mask) before running the base model, so all layers share one computation
and `generate()` keeps it fixed across decoding steps (the KV cache stays valid).
Beam search and `num_return_sequences` repeat each example contiguously
(`repeat_interleave`), so a batch that is a multiple of the stored one is
expanded that way.
"""
from __future__ import annotations

import torch

__all__ = ["RoutingState", "RoutingError"]


class RoutingError(ValueError):
    """Routing inputs missing or inconsistent with the batch."""


class RoutingState:
    def __init__(self) -> None:
        self.version = 0  # bumped by every set(): layers key their generation caches on it
        self.clear()

    def clear(self) -> None:
        self.task_ids: torch.Tensor | None = None  # (b,) long
        self.task_probs: torch.Tensor | None = None  # (b, K) pi(x)
        self.token_mask: torch.Tensor | None = None  # (b, n) 1 for real tokens of the (encoder) input
        self.decoder_token_mask: torch.Tensor | None = None  # (b, m) real decoder tokens (encoder-decoder models)
        self.aux_losses: list[torch.Tensor] = []
        self._expanded: dict[tuple[str, int], torch.Tensor] = {}
        self.ready = False

    def set(self, *, task_ids=None, task_probs=None, token_mask=None, decoder_token_mask=None) -> None:
        self.clear()
        self.task_ids = task_ids
        self.task_probs = task_probs
        self.token_mask = token_mask
        self.decoder_token_mask = decoder_token_mask
        self.ready = True
        self.version += 1

    def _for_batch(self, name: str, value: torch.Tensor | None, batch: int, method: str) -> torch.Tensor:
        if value is None:
            raise RoutingError(
                f"{method} needs {name}, but none was set for this forward; "
                + ("pass task_ids=... to forward()/generate()" if name == "task_ids" else "call the RoutedModel, not its base model")
            )
        stored = value.shape[0]
        if stored == batch:
            return value
        key = (name, batch)
        if key not in self._expanded:
            if batch % stored:
                raise RoutingError(f"batch of {batch} rows does not extend the routed batch of {stored} prompts")
            self._expanded[key] = value.repeat_interleave(batch // stored, dim=0)
        return self._expanded[key]

    def task_ids_for(self, batch: int, method: str) -> torch.Tensor:
        return self._for_batch("task_ids", self.task_ids, batch, method)

    def task_probs_for(self, batch: int, method: str) -> torch.Tensor:
        return self._for_batch("task_probs", self.task_probs, batch, method)

    def token_mask_for(self, shape: torch.Size, decoder: bool = False) -> torch.Tensor | None:
        """The padding mask when it describes these (b, n) tokens; ``decoder``: a layer of an
        encoder-decoder model's decoder, whose tokens are not those of the input mask."""
        name = "decoder_token_mask" if decoder else "token_mask"
        m = getattr(self, name)
        if m is None or m.dim() != 2 or m.shape[1] != shape[1] or shape[0] % m.shape[0]:
            return None
        return self._for_batch(name, m, shape[0], "")

    def add_aux_loss(self, loss: torch.Tensor) -> None:
        self.aux_losses.append(loss)
