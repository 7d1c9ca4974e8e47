"""Finding the layers to adapt in a transformers model."""

from __future__ import annotations

import re

from torch import nn

from orchmoe.core.layer import is_adaptable, layer_shape

# The usual attention projections per model type, as LoRA papers adapt them.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"no default target_modules for model type {model_type!r}; pass target_modules=[...] "
            "(leaf names such as 'q_proj' or a regex over module paths)"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def matches(path: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def find_target_layers(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) width of every Linear/Conv1D the targets select, in model order."""
    targets = default_target_modules(model) if target_modules is None else target_modules
    found: dict[str, tuple[int, int]] = {}
    named = [(p, m) for p, m in model.named_modules() if p and matches(p, targets)]
    for path, module in named:
        if is_adaptable(module):
            found[path] = layer_shape(module)
    if not found:
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if is_adaptable(m)})
        raise ValueError(
            f"target_modules {targets!r} matched no nn.Linear / Conv1D layer of {type(model).__name__}; "
            f"adaptable leaf names in this model: {leaves}"
        )
    return found
