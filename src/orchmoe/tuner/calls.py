"""How one call of a `RoutedModel` runs: routed first, auxiliary losses into the output last.

`RoutedModel.forward` does both itself, so a compiled model is one graph. A library may replace
the instance's ``forward`` (TRL's ``add_fused_lm_head`` installs one that runs the backbone and the
LM head itself, accelerate wraps it in autocast); then module hooks frame whatever forward runs:
the pre-hook routes from the call's inputs (``labels`` included, so OrchMoE routes from the prompt
tokens only) and takes orchmoe's own arguments (``task_ids``, ``routing_mask``) out, and the
forward hook attaches the auxiliary losses (`orchmoe.tuner.outputs.with_aux_loss`). Our forward, when
the replacement calls it, sees that the call was routed and leaves both to the hooks.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from orchmoe.tuner.outputs import with_aux_loss

__all__ = ["CALL_ORDER", "attach_aux", "finish_call", "route_before_call", "route_call"]

#: `forward`'s positional order (the pre-hook names positional arguments by it)
CALL_ORDER = ("input_ids", "attention_mask", "labels", "task_ids", "routing_mask")


def route_call(model: Any, kwargs: dict) -> None:
    """Route one call from its inputs (``kwargs`` as the call passes them), or keep the routing: a step that
    continues a KV cache (or runs the decoder over already encoded prompts) keeps its prompt's routing.
    Takes ``task_ids`` and ``routing_mask`` out of ``kwargs``: they are orchmoe's, not the base model's.

    A static cache keeps its length on the device; reading it would be a host sync, so a call continues
    the decode when it passes the very cache object its routing was set with. To reuse that object for a
    new prompt batch after ``cache.reset()``, call `set_routing` first (or pass a new cache)."""
    if model._unloaded:
        raise RuntimeError(
            "this RoutedModel was unloaded (unload() / merge_and_unload()): call the base model it "
            "returned, or wrap a fresh one with get_model()"
        )
    task_ids, routing_mask = kwargs.pop("task_ids", None), kwargs.pop("routing_mask", None)
    input_ids, cache = kwargs.get("input_ids"), kwargs.get("past_key_values")
    reuse = (
        _continues_decode(cache, model.routing_state.cache)  # a continued decode keeps its prompt's routing
        or (
            input_ids is None
            and kwargs.get("inputs_embeds") is None
            and kwargs.get("encoder_outputs") is not None
            and task_ids is None
        )  # a decoder step over an already encoded prompt
    ) and model.routing_state.ready  # read last: a compiled training forward then never guards on it
    if not reuse:
        model.set_routing(
            input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"),
            inputs_embeds=kwargs.get("inputs_embeds"),
            labels=kwargs.get("labels"),
            task_ids=task_ids,
            routing_mask=routing_mask,
            decoder_attention_mask=kwargs.get("decoder_attention_mask"),
        )
        model.routing_state.cache = _weak(cache)


def attach_aux(model: Any, out: Any, labels=None) -> Any:
    """The output with this call's auxiliary losses (`orchmoe.tuner.outputs.with_aux_loss`)."""
    aux = model.routing_state.aux_losses
    total = None
    if aux:
        loss = out.get("loss") if isinstance(out, dict) else None
        device = loss.device if loss is not None else aux[0].device  # layers may sit on several devices
        total = torch.stack([a.float().to(device) for a in aux]).sum()
        if model._aux_sink is not None:
            model._aux_sink.append(total)
        elif model.aux_loss_in_loss and isinstance(out, dict) and out.get("log_probs") is not None:
            warnings.warn(
                f"{model.adapter_config.method}'s auxiliary loss is added to outputs.loss, but this forward "
                "was replaced by one returning per-token log_probs (TRL's fused LM head), whose trainer "
                "computes its own loss and drops it: train with orchmoe.integrations.RoutedSFTTrainer",
                stacklevel=3,
            )
    return with_aux_loss(out, total, add_to_loss=model.aux_loss_in_loss and model._aux_sink is None, labels=labels)


def _forward_replaced(module: Any) -> bool:
    """Whether a library replaced this instance's ``forward`` (an instance attribute hides the class's)."""
    return "forward" in module.__dict__


def route_before_call(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: when ``forward`` was replaced, route this call, with every argument by name."""
    if not _forward_replaced(module):
        return None  # RoutedModel.forward routes
    if len(args) > len(CALL_ORDER):
        raise TypeError(
            f"RoutedModel takes at most {len(CALL_ORDER)} positional arguments {CALL_ORDER}, got {len(args)}"
        )
    kwargs = dict(kwargs)
    for name, value in zip(CALL_ORDER, args):
        if name in kwargs:
            raise TypeError(f"RoutedModel got multiple values for argument {name!r}")
        kwargs[name] = value
    route_call(module, kwargs)
    module._routed_call = True
    return (), kwargs


def finish_call(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: when ``forward`` was replaced, the auxiliary losses into its output."""
    if not _forward_replaced(module):
        return None  # RoutedModel.forward attached them
    module._routed_call = False
    return attach_aux(module, output, kwargs.get("labels"))


def _weak(cache):
    """A weak reference to a cache object (None for none, or for a legacy tuple cache: no identity to keep)."""
    try:
        return None if cache is None else weakref.ref(cache)
    except TypeError:
        return None


def _continues_decode(cache, routed_cache) -> bool:
    """Whether a forward given this KV cache continues a decode (rather than starting a new prompt batch).

    ``routed_cache``: a weak reference to the cache the current routing was set with, or None."""
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        return True
    n = length()
    if isinstance(n, torch.Tensor):  # a static cache: its length lives on the device, `n > 0` would sync
        return routed_cache is not None and routed_cache() is cache
    return n > 0
