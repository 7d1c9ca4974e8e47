"""The model side of the engine: prefill a group of prompts, decode one step for a running batch, and
merge or shrink a running batch (its KV cache and its routing) between steps.

The one place that talks to the model. A running batch is a `KVBatch`: one transformers
``DynamicCache`` holding every row left-padded to a common length (each row's real tokens end at the
last column), the number of real tokens of each row, and each row's routing. A runner knows its
routing: `RoutedRunner` keeps the rows' routing tensors of an orchmoe `RoutedModel`
(``routing_state``: OrchMoE's pi(x) and allocations, Poly/MHR task ids) and installs them before a
decoding step; `PeftRunner` keeps one PEFT LoRA name per row (``adapter_names=``). Both compute a
prefill exactly as a lone ``generate`` does when a row is prefilled alone (no padding at all), so a
greedy answer differs from it only where batched decoding changes the last bits of a logit.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchmoe.serving.kvcache import UnsupportedModelError, cache_layers, join_caches, select_rows

__all__ = ["KVBatch", "RoutedRunner", "PeftRunner", "UnsupportedModelError", "RowRouting"]


@dataclass
class RowRouting:
    """Per-row routing tensors of a `RoutedModel` batch (None where the method has none).

    Attributes:
        task_ids: (b,) Poly/MHR task ids.
        task_probs: (b, K) OrchMoE's pi(x).
        weights: (L, b, h, S) every adapted layer's allocation (parameter mixing).
    """

    task_ids: torch.Tensor | None = None
    task_probs: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    _DIMS = {"task_ids": 0, "task_probs": 0, "weights": 1}

    @classmethod
    def cat(cls, parts: Sequence[RowRouting]) -> RowRouting:
        out = {}
        for name, dim in cls._DIMS.items():
            values = [getattr(p, name) for p in parts]
            out[name] = None if values[0] is None else torch.cat(values, dim=dim)
        return cls(**out)

    def select(self, index: torch.Tensor) -> RowRouting:
        return RowRouting(
            **{
                n: None
                if getattr(self, n) is None
                else getattr(self, n).index_select(d, index.to(getattr(self, n).device))
                for n, d in self._DIMS.items()
            }
        )


@dataclass
class KVBatch:
    """Rows decoding together: a KV cache left-padded to ``T`` columns, real tokens per row, routing per row.

    Attributes:
        cache: the transformers ``DynamicCache`` (keys/values (b, heads, T, head_dim) per layer).
        lengths: (b,) long, the real tokens each row has in the cache (they fill its last columns).
        routing: the runner's per-row routing (`RowRouting` or a list of LoRA names).
    """

    cache: Any
    lengths: torch.Tensor
    routing: Any

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return int(cache_layers(self.cache)[0].keys.shape[-2])


def mask_of(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The (b, width) attention mask of rows whose ``lengths`` real tokens fill their last columns."""
    cols = torch.arange(width, device=lengths.device)
    return (cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()  # (b, width)


class _Runner:
    """What both runners share: the batch operations on the cache, the forward calls."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                "serving batches decoder-only models (an encoder-decoder's cross-attention cache is not merged)"
            )
        self.model, self.tokenizer, self.base = model, tokenizer, base
        self.device = next(base.parameters()).device
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        params = inspect.signature(base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.25 says `cache`
        self.keep_arg = "logits_to_keep" in params
        self.max_positions = int(
            getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", 0) or 0
        )

    # -- batch operations ------------------------------------------------------------------------
    def merge(self, a: KVBatch | None, *others: KVBatch) -> KVBatch:
        """One batch of ``a``'s rows (None: none) then each of ``others``', every cache left-padded to the widest
        (`orchmoe.serving.kvcache.join_caches`), the routing concatenated."""
        parts = ([a] if a is not None and a.size else []) + list(others)
        cache, _ = join_caches([p.cache for p in parts])
        routing = parts[0].routing
        for p in parts[1:]:
            routing = self.cat_routing(routing, p.routing)
        return KVBatch(cache, torch.cat([p.lengths for p in parts]), routing)

    def select(self, batch: KVBatch, keep: Sequence[int]) -> KVBatch | None:
        """The batch of rows ``keep`` only (None when empty), its columns cut to the longest remaining row."""
        if not keep:
            return None
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        lengths = batch.lengths.index_select(0, index)
        cache = select_rows(batch.cache, index, int(lengths.max()))
        return KVBatch(cache, lengths, self.select_routing(batch.routing, index, keep))

    # -- forwards ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], routes: Sequence[Any]) -> tuple[torch.Tensor, KVBatch]:
        """Run prompts (left-padded together; one prompt: no padding at all) into a fresh cache.

        Args:
            prompts: token ids of each prompt.
            routes: each row's routing request (runner-specific: a task id, a LoRA name).
        Returns:
            The last position's logits (n, V) fp32 and the batch of these rows.
        """
        from transformers import DynamicCache

        n, width = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask = mask_of(lengths, width)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (n, width): 0.. on the real tokens
        cache = DynamicCache(config=self.base.config)
        logits, routing = self._prefill_call(ids, mask, positions, cache, routes)
        cache_layers(cache)  # refuse a cache that cannot be merged before it joins a batch
        return logits[:, -1].float(), KVBatch(cache, lengths, routing)

    @torch.inference_mode()
    def decode(self, batch: KVBatch, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its last sampled token; returns the next logits (b, V) fp32. ``batch.lengths`` grows by 1."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device).unsqueeze(1)  # (b, 1)
        positions = batch.lengths.unsqueeze(1)  # (b, 1): the new token follows the row's real tokens
        batch.lengths = batch.lengths + 1
        mask = mask_of(batch.lengths, batch.width + 1)  # (b, T+1)
        return self._decode_call(ids, mask, positions, batch)[:, -1].float()

    def _call(self, module: Any, ids, mask, positions, cache, prefill: bool, **extra) -> torch.Tensor:
        kwargs = {self.cache_arg: cache, **extra}
        if prefill and self.keep_arg:
            kwargs["logits_to_keep"] = 1  # (n, 1, V): the prompt's other logits are never read
        return module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs).logits

    # runner-specific
    def _prefill_call(self, ids, mask, positions, cache, routes) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def _decode_call(self, ids, mask, positions, batch: KVBatch) -> torch.Tensor:
        raise NotImplementedError

    def cat_routing(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def select_routing(self, routing: Any, index: torch.Tensor, keep: Sequence[int]) -> Any:
        raise NotImplementedError


class RoutedRunner(_Runner):
    """An orchmoe `RoutedModel`, run as its ``generate`` runs it: `set_routing` from the prompts (Poly/MHR: task
    ids) at the prefill, then the wrapped transformers model under that routing. The rows' routing tensors are
    kept; before a decoding step the batch's routing is installed in ``model.routing_state`` (once per change
    of the batch's rows: the layers rebuild their mixed weights then)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        model.eval()  # routers in evaluation mode: no Gumbel noise, the routing of a prompt is fixed
        self.needs_task_ids = bool(model.adapter_config.needs_task_ids)
        self._installed: RowRouting | None = None

    def _prefill_call(self, ids, mask, positions, cache, routes):
        task_ids = None
        if self.needs_task_ids:
            task_ids = torch.as_tensor([int(r) for r in routes], dtype=torch.long, device=self.device)
        self._installed = None  # the prefill replaces the routing state with its own rows'
        self.model.set_routing(input_ids=ids, attention_mask=mask, task_ids=task_ids)
        with self.model.holding_routing():  # the base model's own hooks keep the routing just set
            logits = self._call(self.base, ids, mask, positions, cache, prefill=True)
        state = self.model.routing_state
        return logits, RowRouting(state.task_ids, state.task_probs, state.weights)

    def _decode_call(self, ids, mask, positions, batch):
        r, state = batch.routing, self.model.routing_state
        current = state.task_ids is r.task_ids and state.task_probs is r.task_probs and state.weights is r.weights
        if self._installed is not r or not current:  # (someone else may have routed the model in between)
            state.set(task_ids=r.task_ids, task_probs=r.task_probs, weights=r.weights)
            self._installed = r
        with self.model.holding_routing():
            return self._call(self.base, ids, mask, positions, batch.cache, prefill=False)

    def cat_routing(self, a: RowRouting, b: RowRouting) -> RowRouting:
        return RowRouting.cat([a, b])

    def select_routing(self, routing: RowRouting, index, keep) -> RowRouting:
        return routing.select(index)


class PeftRunner(_Runner):
    """A ``peft.PeftModel`` holding several plain LoRAs: each row names its LoRA (``adapter_names=``,
    ``"__base__"`` for the base model), as engines serving one LoRA per request do."""

    def _prefill_call(self, ids, mask, positions, cache, routes):
        names = [str(r) for r in routes]
        return self._call(self.model, ids, mask, positions, cache, prefill=True, adapter_names=names), names

    def _decode_call(self, ids, mask, positions, batch):
        names = list(batch.routing)
        return self._call(self.model, ids, mask, positions, batch.cache, prefill=False, adapter_names=names)

    def cat_routing(self, a: list[str], b: list[str]) -> list[str]:
        return list(a) + list(b)

    def select_routing(self, routing: list[str], index, keep) -> list[str]:
        return [routing[i] for i in keep]
