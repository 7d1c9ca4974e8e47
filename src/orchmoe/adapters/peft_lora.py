"""PEFT both ways, inbound: a ``peft.LoraConfig`` where an orchmoe config is expected, and a mixture
whose skills start from an existing PEFT LoRA adapter.

Outbound (one routing as a PEFT LoRA folder) is `orchmoe.adapters.export`.

Starting from a LoRA: every skill (expert) of every adapted layer is set to the LoRA's (A, B). The
mixtures combine their experts with weights that sum to one (parameter mixing: the allocation
w over S skills; output mixing: each rank block's gates over its experts), so the mixed update is
the LoRA's whatever the routing, and the model starts equal to the LoRA, in training mode too.
MoDE's shared down-projection takes A; every expert's rank columns take B's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchmoe.adapters.folder import AdapterMismatchError
from orchmoe.core.config import AdapterConfig, ConfigError, LoraConfig, MHRConfig, PolyConfig
from orchmoe.core.layer import is_adaptable

__all__ = ["from_peft_config", "init_from_peft_lora", "read_peft_lora"]

#: fields that say nothing about the adapter's computation (bookkeeping, or detected from the layers: fan_in_fan_out)
_BOOKKEEPING = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
}
_ORCHMOE_CONFIGS = "LoraConfig, PolyConfig, MHRConfig, MoLoRAConfig, MoDEConfig or OrchMoEConfig"
_PEFT_KEY_PREFIX = "base_model.model."


def _unsupported(cfg: Any, converted: set[str]) -> list[str]:
    """Fields of a PEFT config that differ from their default and that orchmoe does not convert."""
    default = type(cfg)()
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in converted or f.name in _BOOKKEEPING:
            continue
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if value != base and not (value in (None, {}, []) and base in (None, {}, [])):
            out.append(f"{f.name}={value!r}")
    return out


def _target_modules(cfg: Any, base_model: nn.Module | None) -> list[str] | str | None:
    """PEFT's target_modules in orchmoe's terms (the same rules: leaf-name suffixes or one full-match regex)."""
    tm = cfg.target_modules
    if tm is None:  # PEFT's own default for the model type, which may differ from orchmoe's
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        found = defaults.get(model_type)
        return list(found) if found else None
    if isinstance(tm, str) and tm.lower() == "all-linear":
        if base_model is None:
            raise ConfigError(
                "target_modules='all-linear' needs the base model: pass the config to get_model(base, config)"
            )
        out_emb = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
        return sorted(
            {p.rsplit(".", 1)[-1] for p, m in base_model.named_modules() if p and is_adaptable(m) and m is not out_emb}
        )
    return tm if isinstance(tm, str) else sorted(tm)


def from_peft_config(cfg: Any, base_model: nn.Module | None = None) -> AdapterConfig:
    """The orchmoe config of a PEFT config: ``peft.LoraConfig`` -> `LoraConfig`, ``peft.PolyConfig`` ->
    `PolyConfig` / `MHRConfig`.

    Converted: ``r``, ``lora_alpha`` (``use_rslora``'s alpha / sqrt(r) scale included), ``lora_dropout``,
    ``target_modules`` (``"all-linear"`` and PEFT's per-model defaults resolved on ``base_model``). Any other
    setting orchmoe does not have (DoRA, biases, rank/alpha patterns, modules_to_save, another
    initialisation, ...) is an error naming it.

    Args:
        cfg: a ``peft.LoraConfig`` / ``peft.PolyConfig``; an orchmoe config is returned as it is.
        base_model: resolves ``target_modules="all-linear"`` (required then) and PEFT's default targets.
    Returns:
        The orchmoe config (PEFT's Poly scale 1/r kept: ``alpha=1``).
    Raises:
        ConfigError: a PEFT setting without an orchmoe counterpart, or a PEFT method orchmoe does not have.
        TypeError: ``cfg`` is neither an orchmoe nor a PEFT config.
    """
    if isinstance(cfg, AdapterConfig):  # already an orchmoe config
        return cfg
    peft_type = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "")) or "")
    if not peft_type or not dataclasses.is_dataclass(cfg):
        raise TypeError(
            f"expected an orchmoe config ({_ORCHMOE_CONFIGS}) or a peft.LoraConfig, got {type(cfg).__name__}"
        )
    convert = _FROM_PEFT.get(peft_type.upper())
    if convert is None:
        raise ConfigError(
            f"peft.{type(cfg).__name__} ({peft_type}) has no orchmoe counterpart: orchmoe builds routed "
            f"mixtures of LoRA experts; pass one of orchmoe's configs ({_ORCHMOE_CONFIGS})"
        )
    return convert(cfg, base_model)


def _from_lora(cfg: Any, base_model: nn.Module | None) -> AdapterConfig:
    bad = _unsupported(cfg, {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"})
    if cfg.init_lora_weights is not True:
        bad = [b for b in bad if not b.startswith("init_lora_weights")] + [
            f"init_lora_weights={cfg.init_lora_weights!r}"
        ]
    if bad:
        raise ConfigError(
            f"peft.{type(cfg).__name__} sets {', '.join(bad)}, which orchmoe does not support: orchmoe's "
            "LoraConfig has rank (r), alpha (lora_alpha), dropout (lora_dropout) and target_modules"
        )
    alpha = cfg.lora_alpha * math.sqrt(cfg.r) if cfg.use_rslora else cfg.lora_alpha  # rsLoRA: alpha / sqrt(r)
    return LoraConfig(
        rank=cfg.r, alpha=float(alpha), dropout=cfg.lora_dropout, target_modules=_target_modules(cfg, base_model)
    )


def _from_poly(cfg: Any, base_model: nn.Module | None) -> AdapterConfig:
    bad = _unsupported(cfg, {"r", "target_modules", "n_tasks", "n_skills", "n_splits"})
    if bad:
        raise ConfigError(
            f"peft.{type(cfg).__name__} sets {', '.join(bad)}, which orchmoe's PolyConfig / MHRConfig do not have"
        )
    cls = MHRConfig if cfg.n_splits > 1 else PolyConfig
    return cls(
        rank=cfg.r,
        alpha=1.0,
        n_tasks=cfg.n_tasks,
        n_skills=cfg.n_skills,
        n_splits=cfg.n_splits,
        target_modules=_target_modules(cfg, base_model),
    )  # PEFT's Poly scales by 1/r: alpha = 1


#: PEFT method (``peft_type``) -> its orchmoe config
_FROM_PEFT = {"LORA": _from_lora, "POLY": _from_poly}


def read_peft_lora(path: str | os.PathLike) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA folder: its ``peft.LoraConfig`` and ``{layer path: (A (r, P), B (Q, r))}``.

    Raises:
        FileNotFoundError / AdapterMismatchError: not a PEFT LoRA folder, or tensors orchmoe cannot start from.
    """
    import peft
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {folder}: not a PEFT adapter folder")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {folder} (a .bin adapter must be re-saved with safe_serialization=True)"
        )
    cfg = peft.PeftConfig.from_pretrained(str(folder))
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)).upper() != "LORA":
        raise AdapterMismatchError(f"{folder} holds a {cfg.peft_type} adapter, not a LoRA")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weights)).items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key.removeprefix(_PEFT_KEY_PREFIX))
        if m is None:
            raise AdapterMismatchError(
                f"{weights}: tensor {key!r} is not a LoRA A/B weight (embedding LoRA, DoRA "
                "magnitudes, biases and modules_to_save cannot start a routed mixture)"
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    incomplete = sorted(p for p, ab in pairs.items() if len(ab) != 2)
    if incomplete:
        raise AdapterMismatchError(f"{weights}: layers without both lora_A and lora_B: {incomplete[:5]}")
    return cfg, {p: (ab["lora_A"], ab["lora_B"]) for p, ab in pairs.items()}


@torch.no_grad()
def init_from_peft_lora(model: Any, path: str | os.PathLike) -> None:
    """Set every skill of ``model`` (a `RoutedModel` of any method) to the PEFT LoRA in ``path``.

    The LoRA's rank must be the config's ``rank`` and its layers the adapted layers; a different scale
    (PEFT's ``lora_alpha / r`` vs ``alpha / rank``) is folded into B, so the update is the LoRA's.

    Args:
        model: the `RoutedModel`, changed in place (its cached mixed weights dropped).
        path: a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    Raises:
        FileNotFoundError: not a PEFT adapter folder (or no safetensors weights).
        AdapterMismatchError: another rank, other layers, or shapes that do not fit.
    """
    peft_cfg, pairs = read_peft_lora(path)
    theirs = from_peft_config(peft_cfg)  # rejects what a plain LoRA update cannot express
    cfg = model.adapter_config
    if peft_cfg.r != cfg.rank:
        raise AdapterMismatchError(
            f"the LoRA in {path} has rank r={peft_cfg.r}, this {cfg.method} adapter rank "
            f"{cfg.rank}: build it with rank={peft_cfg.r}"
        )
    layers = model.routed_layers
    if set(pairs) != set(layers):
        only_lora, only_ours = sorted(set(pairs) - set(layers)), sorted(set(layers) - set(pairs))
        raise AdapterMismatchError(
            f"the LoRA in {path} adapts other layers than this model: only in the LoRA "
            f"{only_lora[:4]}, only here {only_ours[:4]} (set target_modules to the LoRA's "
            f"{peft_cfg.target_modules!r})"
        )
    factor = theirs.scale / cfg.scale  # PEFT's scale over ours, folded into B
    for p, layer in layers.items():
        A, B = pairs[p]  # (r, P), (Q, r)
        if tuple(A.shape) != (cfg.rank, layer.in_features) or tuple(B.shape) != (layer.out_features, cfg.rank):
            raise AdapterMismatchError(
                f"{p}: the LoRA's A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                f"{layer.in_features} -> {layer.out_features} layer of rank {cfg.rank}"
            )
        layer.lora_A.copy_(A.T.to(layer.lora_A).expand_as(layer.lora_A))  # (P, r) into every (D, P, r) slot
        layer.lora_B.copy_((B.T.double() * factor).to(layer.lora_B).expand_as(layer.lora_B))  # (r, Q) into (S, r, Q)
    model.routing_state.mixed.clear()  # mixed weights cached for decoding are stale
