"""How every call of the adapted transformers model runs: routed first, auxiliary losses into its output last.

The routing cannot live in one wrapper's ``forward``: the transformers model is reached through many doors
(``peft.PeftModelForCausalLM.forward`` calls the tuner, a plain ``peft.PeftModel`` calls the transformers
model itself, ``generate`` calls it once per decoding step, TRL may replace its ``forward``). So `RoutedModel`
hooks the transformers model itself: the forward pre-hook (`before_forward`) routes from the call's inputs
(``labels`` too, so OrchMoE routes from the prompt tokens only) and takes orchmoe's own arguments
(``task_ids``, ``routing_mask``) out of the call; the forward hook (`after_forward`) attaches the auxiliary
losses (`orchmoe.tuner.outputs.with_aux_loss`). Whatever door a call comes through, it is routed once.

Task ids and PEFT: ``PeftModelForCausalLM.forward`` (and the Seq2Seq one) names ``task_ids`` as its own
parameter and hands it on only to PEFT's own Poly, so a task id given there would be lost. `accept_task_ids`
puts a pre-hook on such a PeftModel that renames it to ``orchmoe_task_ids``, which PEFT passes on untouched;
orchmoe installs it on every PeftModel it builds or loads (`orchmoe.get_model`, `orchmoe.load_adapter`,
``PeftModel.from_pretrained``, ``save_pretrained``). A model from a bare ``peft.get_peft_model`` of a
task-routed config gets it at `accept_task_ids`; until then its forward names the limit (`RoutingError`).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any

import torch

from orchmoe.tuner.outputs import with_aux_loss

__all__ = ["ROUTING_KWARGS", "accept_task_ids", "after_forward", "before_forward", "route_call", "attach_aux"]

#: orchmoe's own call arguments, never passed to the transformers model (``orchmoe_task_labels``: each example's
#: task for the routing diagnostics of a method that does not route by it, OrchMoE's NMI with the tasks)
ROUTING_KWARGS = ("task_ids", "orchmoe_task_ids", "routing_mask", "orchmoe_task_labels")
_TASK_ID_HOOK = "_orchmoe_task_id_hook"


def _bind(model: Any, args: tuple, kwargs: dict) -> dict:
    """The call's arguments all by name (positional ones named by the model's ``forward`` signature)."""
    if not args:
        return dict(kwargs)
    params = getattr(model, "_orchmoe_forward_params", None)
    if params is None:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        model.__dict__["_orchmoe_forward_params"] = params
    if len(args) > len(params):
        raise TypeError(f"{type(model).__name__}.forward takes at most {len(params)} positional arguments")
    named = dict(kwargs)
    for name, value in zip(params, args):
        if name in named:
            raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
        named[name] = value
    return named


def before_forward(tuner: Any, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the transformers model: route this call (or keep the routing of the prompt it
    continues), with every argument by name and orchmoe's own taken out.

    Args:
        tuner: the `RoutedModel` whose layers sit in ``module``.
        module: the transformers model being called.
        args, kwargs: the call's arguments.
    Returns:
        ``((), kwargs)`` without orchmoe's arguments.
    """
    kwargs = _bind(module, args, kwargs)
    tuner.check_usable()
    routing = {k: kwargs.pop(k) for k in ROUTING_KWARGS if k in kwargs}
    if tuner.routing_frozen:  # inside RoutedModel.generate: the prompt's routing holds for every step
        return (), kwargs
    task_ids = routing.get("orchmoe_task_ids")
    if task_ids is None:
        task_ids = routing.get("task_ids")
    route_call(tuner, kwargs, task_ids=task_ids, routing_mask=routing.get("routing_mask"))
    tuner.record_routing_window(routing.get("orchmoe_task_labels"), task_ids)
    tuner.call_labels = kwargs.get("labels")
    tuner.call_items = kwargs.get("num_items_in_batch")
    return (), kwargs


def after_forward(tuner: Any, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook of the transformers model: the auxiliary losses of this call into its output."""
    labels, items = tuner.call_labels, tuner.call_items
    tuner.call_labels = tuner.call_items = None
    return attach_aux(tuner, output, labels, items)


def route_call(tuner: Any, kwargs: dict, task_ids=None, routing_mask=None) -> None:
    """Route one call from its inputs, or keep the routing: a step that continues a KV cache (or runs the
    decoder over already encoded prompts) keeps its prompt's routing.

    A static cache keeps its length on the device; reading it would be a host sync, so a call continues
    the decode when it passes the very cache object its routing was set with. To reuse that object for a
    new prompt batch after ``cache.reset()``, call `RoutedModel.set_routing` first (or pass a new cache).
    """
    input_ids = kwargs.get("input_ids")
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers >= 5.2x also names it `cache`
    state = tuner.routing_state
    reuse = (
        _continues_decode(cache, state.cache)
        or (
            input_ids is None
            and kwargs.get("inputs_embeds") is None
            and kwargs.get("encoder_outputs") is not None
            and task_ids is None
        )  # a decoder step over an already encoded prompt
    ) and state.ready  # read last: a compiled training forward then never guards on it
    if not reuse:
        tuner.set_routing(
            input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"),
            inputs_embeds=kwargs.get("inputs_embeds"),
            labels=kwargs.get("labels"),
            task_ids=task_ids,
            routing_mask=routing_mask,
            decoder_attention_mask=kwargs.get("decoder_attention_mask"),
        )
        state.cache = _weak(cache)


def attach_aux(tuner: Any, out: Any, labels=None, num_items_in_batch=None) -> Any:
    """The output with this call's auxiliary losses (`orchmoe.tuner.outputs.with_aux_loss`), added to its loss.

    Under `transformers.Trainer`'s token-normalised loss (a call given ``num_items_in_batch``, the answer tokens
    of the whole accumulated batch across processes) the LM loss of a micro-batch is its token sum over that
    count; the auxiliary loss, a mean per micro-batch, is weighted by this micro-batch's share of those tokens,
    so over the accumulation (and, once the Trainer scales by the process count, over the processes) the
    auxiliary term is its token-weighted mean, whatever the accumulation steps.
    """
    aux = tuner.routing_state.aux_losses
    total = None
    if aux:
        loss = out.get("loss") if isinstance(out, dict) else None
        device = loss.device if loss is not None else aux[0].device  # layers may sit on several devices
        total = torch.stack([a.float().to(device) for a in aux]).sum()
        if num_items_in_batch is not None and labels is not None:
            mine = (labels[..., 1:] != -100).sum() if labels.dim() > 1 else (labels != -100).sum()
            total = total * (mine.to(total.dtype) / torch.as_tensor(num_items_in_batch, device=device).to(total.dtype))
        if torch.is_grad_enabled():  # a training forward: kept for the logs (orchmoe.training.callbacks)
            tuner.aux_window.append(total.detach())
        if isinstance(out, dict) and out.get("log_probs") is not None and tuner.aux_loss_in_loss:
            warnings.warn(
                f"{tuner.adapter_config.method}'s auxiliary loss is added to outputs.loss, but this forward returns "
                "per-token log_probs (TRL's fused LM head): a trainer that computes its own loss from log_probs "
                "drops it (it is in outputs.aux_loss)",
                stacklevel=3,
            )
    return with_aux_loss(out, total, add_to_loss=tuner.aux_loss_in_loss, labels=labels)


def _rename_task_ids(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """PeftModel pre-hook: ``task_ids`` -> ``orchmoe_task_ids``, which PEFT's forward passes on."""
    if kwargs.get("task_ids") is None:
        return None
    kwargs = dict(kwargs)
    kwargs["orchmoe_task_ids"] = kwargs.pop("task_ids")
    return args, kwargs


def accept_task_ids(peft_model: Any) -> Any:
    """Let ``peft_model(..., task_ids=...)`` reach orchmoe's router through PEFT's forward (see the module
    docstring); idempotent. Returns the model."""
    if not isinstance(peft_model, torch.nn.Module) or _TASK_ID_HOOK in peft_model.__dict__:
        return peft_model
    peft_model.__dict__[_TASK_ID_HOOK] = peft_model.register_forward_pre_hook(_rename_task_ids, with_kwargs=True)
    return peft_model


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
