"""orchmoe's methods as PEFT methods: each one registered with PEFT's extension point.

`peft.register_peft_method(name=..., config_cls=..., model_cls=...)` is how a tuner joins PEFT: after it,
``peft.get_peft_model(base, OrchMoEConfig(...))`` builds a ``peft.PeftModel`` around orchmoe's tuner
(`orchmoe.tuner.model.RoutedModel`), and ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM``
read the method back from ``peft_type`` in ``adapter_config.json``.

PEFT keeps its method names in an enum (``peft.utils.PeftType``) and registers only names it holds; a
package outside PEFT cannot add a member through any public call, so this module adds ``ORCHMOE_<METHOD>``
members to the enum itself (`_add_peft_type`), once per method, before registering it. That is the one
place orchmoe reaches into PEFT's internals; `tests/tuner/test_peft_native.py` watches it.
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

from orchmoe.core.registry import on_register

__all__ = ["register_all", "peft_type_member"]


def _add_peft_type(name: str) -> PeftType:
    """PeftType's member ``name``, added when missing (an `enum` cannot be extended by a public call)."""
    try:
        return PeftType(name)
    except ValueError:
        pass
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member) if name not in PeftType.__dict__ else None
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def peft_type_member(config_cls: type) -> enum.Enum:
    """The PeftType member of an orchmoe config class (added to the enum when missing)."""
    return _add_peft_type(config_cls.peft_type_name())


def _register(name: str, config_cls: type, router_cls: type) -> None:
    """Register one orchmoe method with PEFT (once; a re-import is a no-op)."""
    from orchmoe.tuner.model import RoutedModel

    member = peft_type_member(config_cls)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is RoutedModel:
        return
    register_peft_method(name=member.value.lower(), config_cls=config_cls, model_cls=RoutedModel)


def register_all() -> None:
    """Register every orchmoe method with PEFT, and every method registered later (`orchmoe.register_method`)."""
    on_register(_register)
