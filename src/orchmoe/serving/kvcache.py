"""The running batch's KV cache: rows joined and dropped between decoding steps, tokens written in place.

Every row of a batch is left-aligned to a common width ``T``: a row's real tokens fill its last columns,
the columns before them are zeros (masked out by the attention mask; zeros, not garbage, so a masked
column cannot turn an attention sum into NaN). Each layer's keys and values live in a buffer with free
columns after ``T`` (`GrowingLayer`): a decoding step writes its token there, where transformers'
``DynamicLayer`` concatenates (copies) the whole cache at every step. Joining or dropping rows builds
new buffers once.

Only full-attention caches (``DynamicLayer``) can be merged this way: sliding-window, linear-attention
and quantised layers keep other state, and `cache_layers` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "UnsupportedModelError", "cache_layers", "join_caches", "select_rows"]

#: free columns a buffer is given when it is (re)built: a reallocation every this many decoding steps
HEADROOM = 16


class UnsupportedModelError(ValueError):
    """A model whose KV cache the engine cannot merge (encoder-decoder, sliding-window or linear attention)."""


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values (b, heads, T, d) are views of (b, heads, T + free, d) buffers.

    ``keys`` / ``values`` are what transformers reads (their length is the cache length); `update` writes new
    columns into the free ones and rebuilds the buffers with ``HEADROOM`` more only when they are full.
    """

    def __init__(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: int) -> None:
        super().__init__()
        self.is_initialized, self.device = True, k_buffer.device
        self._k, self._v, self._t = k_buffer, v_buffer, length
        self.keys, self.values = k_buffer[:, :, :length], v_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self._t + n > self._k.shape[-2]:
            grown = _buffers([self.keys], [self.values], self._t, max(HEADROOM, n))
            self._k, self._v = grown
        self._k[:, :, self._t : self._t + n] = key_states
        self._v[:, :, self._t : self._t + n] = value_states
        self._t += n
        self.keys, self.values = self._k[:, :, : self._t], self._v[:, :, : self._t]
        return self.keys, self.values


def cache_layers(cache: Any) -> list:
    """The cache's layers, each a full-attention ``DynamicLayer`` (or a `GrowingLayer`); else a clear error."""
    layers = list(getattr(cache, "layers", []))
    odd = {type(layer).__name__ for layer in layers if type(layer) not in (DynamicLayer, GrowingLayer)}
    if odd or not layers:
        raise UnsupportedModelError(
            f"continuous batching merges full-attention KV caches; this model's cache has {sorted(odd) or 'no'} layers"
        )
    return layers


def _buffers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], width: int, room: int):
    """(sum b, heads, width + room, d) buffers holding the pieces one after another along the batch, each
    right-aligned at column ``width`` (zeros before it)."""
    rows = sum(k.shape[0] for k in keys)
    k0, v0 = keys[0], values[0]
    kb = k0.new_zeros((rows, k0.shape[1], width + room, k0.shape[-1]))
    vb = v0.new_zeros((rows, v0.shape[1], width + room, v0.shape[-1]))
    start = 0
    for k, v in zip(keys, values):
        n, t = k.shape[0], k.shape[-2]
        kb[start : start + n, :, width - t : width] = k
        vb[start : start + n, :, width - t : width] = v
        start += n
    return kb, vb


def join_caches(caches: Sequence[Any]) -> tuple[Any, int]:
    """One cache of the caches' rows, in order (the first cache object, its layers replaced); and its width."""
    per_cache = [cache_layers(c) for c in caches]
    width = max(layers[0].keys.shape[-2] for layers in per_cache)
    first = caches[0]
    for i in range(len(per_cache[0])):
        kb, vb = _buffers([ls[i].keys for ls in per_cache], [ls[i].values for ls in per_cache], width, HEADROOM)
        for layers in per_cache:  # the pieces are copied: free them layer by layer (peak: one layer twice)
            _release(layers[i])
        first.layers[i] = GrowingLayer(kb, vb, width)
    return first, width


def _release(layer: Any) -> None:
    layer.keys = layer.values = None
    if isinstance(layer, GrowingLayer):
        layer._k = layer._v = None


def select_rows(cache: Any, index: torch.Tensor, width: int) -> Any:
    """Keep rows ``index`` (a LongTensor) and the last ``width`` columns, in new buffers."""
    for i, layer in enumerate(cache_layers(cache)):
        keys = layer.keys.index_select(0, index)[:, :, -width:]
        values = layer.values.index_select(0, index)[:, :, -width:]
        _release(layer)
        kb, vb = _buffers([keys], [values], width, HEADROOM)
        cache.layers[i] = GrowingLayer(kb, vb, width)
    return cache
