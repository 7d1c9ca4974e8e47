"""`get_model`: the short way to a routed PEFT model (``peft.get_peft_model`` plus orchmoe's conveniences)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from orchmoe.adapters.peft_lora import from_peft_config, init_from_peft_lora
from orchmoe.adapters.unit_save import adopt_saves
from orchmoe.core.config import AdapterConfig
from orchmoe.core.layer import RoutedLoraLayer
from orchmoe.tuner.calls import accept_task_ids

__all__ = ["get_model"]


def get_model(
    base_model: nn.Module,
    config: Any,
    base_model_name: str | None = None,
    *,
    base_model_source: str | None = None,
    init_lora: str | os.PathLike | None = None,
) -> Any:
    """Inject ``config``'s routed experts into ``base_model`` (in place), freeze the rest, return the PEFT model.

    The same as ``peft.get_peft_model(base_model, config)`` (orchmoe's methods are PEFT methods), plus: the
    config's ``task_type`` filled from the model when unset (``CAUSAL_LM`` or ``SEQ_2_SEQ_LM``), a
    ``peft.LoraConfig`` / ``peft.PolyConfig`` converted, ``task_ids=`` accepted by the PeftModel's forward
    (`orchmoe.tuner.calls.accept_task_ids`), and the skills optionally started from a PEFT LoRA.

    Args:
        base_model: a transformers model (decoder-only or encoder-decoder).
        config: the method's config (``LoraConfig``, ``PolyConfig``, ``OrchMoEConfig``, ...) or a PEFT LoRA/Poly config.
        base_model_name: the portable name recorded in saved adapters (default: the model's ``name_or_path``).
        base_model_source: the path or hub id the base model loads from, recorded as PEFT's
            ``base_model_name_or_path`` (default: the ``name_or_path`` that ``from_pretrained`` recorded).
        init_lora: a PEFT LoRA adapter folder every skill starts equal to (the model starts equal to it).
    Returns:
        The ``peft.PeftModel``; its ``base_model`` is orchmoe's `RoutedModel`.
    Raises:
        ConfigError: an invalid config; a PEFT setting orchmoe does not have.
        ValueError: ``base_model`` already carries routed layers.
    """
    from peft import get_peft_model

    if not isinstance(config, AdapterConfig):
        config = from_peft_config(config, base_model)  # a PEFT config converted
    if any(isinstance(m, RoutedLoraLayer) for m in base_model.modules()):
        raise ValueError(
            f"{type(base_model).__name__} already carries routed adapters: build on a fresh base model "
            "(or the result of unload())"
        )
    if config.task_type is None:
        enc_dec = bool(getattr(getattr(base_model, "config", None), "is_encoder_decoder", False))
        config = dataclasses.replace(config, task_type="SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM")
    model = adopt_saves(accept_task_ids(get_peft_model(base_model, config)))
    tuner = model.base_model
    if base_model_source:
        model.peft_config["default"].base_model_name_or_path = base_model_source
    if base_model_name:
        tuner.base_model_name = base_model_name
    if init_lora is not None:
        try:
            init_from_peft_lora(tuner, init_lora)
        except BaseException:
            tuner.unload()  # the caller's base model as it was
            raise
    return model
