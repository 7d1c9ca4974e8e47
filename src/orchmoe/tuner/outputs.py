"""Model outputs that carry the adapter's auxiliary loss as a real field.

A routed model returns its base model's output class extended by one optional field,
``aux_loss`` (MoLoRA's load-balancing loss, OrchMoE's balance term; None when there is none).
A key added to a `ModelOutput` that is not one of its dataclass fields breaks every tool that
rebuilds outputs from their fields: DDP's output pytree, ``torch.compile``, ``accelerate``'s
``send_to_device``. So the extension is a dataclass subclass, built once per output class with
`dataclasses.make_dataclass` (transformers registers every `ModelOutput` subclass as a pytree
node, so DDP rebuilds it with the new field).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.utils import ModelOutput

__all__ = ["routed_output_class", "with_aux_loss"]

_CLASSES: dict[type, type] = {}


def routed_output_class(cls: type) -> type:
    """``cls`` with an optional ``aux_loss`` field (``cls`` itself when it already has one, as MoE outputs do)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    if any(f.name == "aux_loss" for f in dataclasses.fields(cls)):
        new = cls
    else:
        name = f"Routed{cls.__name__}"
        while name in globals():  # two base classes of one name (from different modules)
            name += "_"
        new = dataclasses.make_dataclass(
            name,
            [("aux_loss", "torch.FloatTensor | None", dataclasses.field(default=None))],
            bases=(cls,),
            namespace={
                "__module__": __name__,
                "__doc__": f"`{cls.__name__}` plus ``aux_loss``: the routed adapter's auxiliary training loss "
                "(already included in ``loss`` unless a trainer adds it itself), or None.",
            },
        )
        globals()[name] = new  # importable by name, so outputs pickle
    _CLASSES[cls] = new
    return new


def with_aux_loss(out: Any, aux: torch.Tensor | None, add_to_loss: bool, labels: torch.Tensor | None = None) -> Any:
    """``out`` with the auxiliary loss in its ``aux_loss`` field (None when there is none) and, with
    ``add_to_loss``, added to its ``loss`` when it has one.

    A `ModelOutput` becomes its `routed_output_class`; an output class that already has an
    ``aux_loss`` (a mixture-of-experts base model) gets ours added to its own. A plain tuple
    (``return_dict=False``) has no field for it: its first element is the loss when ``labels``
    were given, and the auxiliary loss is added there.
    """
    if isinstance(out, ModelOutput):
        fields = dict(out.items())  # the set fields (a ModelOutput keeps no None field as a key)
        if aux is not None:
            own = fields.get("aux_loss")
            fields["aux_loss"] = aux if own is None else own + aux.to(own.device, own.dtype)
            if add_to_loss and fields.get("loss") is not None:
                fields["loss"] = fields["loss"] + aux.to(fields["loss"].device, fields["loss"].dtype)
        return routed_output_class(type(out))(**fields)
    if aux is None or not add_to_loss:
        return out
    if isinstance(out, dict) and out.get("loss") is not None:
        out["loss"] = out["loss"] + aux.to(out["loss"].dtype)
        out["aux_loss"] = aux
    elif (
        isinstance(out, tuple) and labels is not None and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0
    ):
        out = (out[0] + aux.to(out[0].dtype),) + tuple(out[1:])
    return out
