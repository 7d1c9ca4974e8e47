"""Trainable-parameter accounting and budget matching across methods.

Methods are compared at equal trainable budgets (the papers match a LoRA of
rank 8). `count_parameters` is the METHODS.md formula for a config on a set of
layer shapes; tests check it against the parameters a built model really has.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

from torch import nn

from orchmoe.core.config import AdapterConfig, ConfigError, LoraConfig
from orchmoe.core.targets import find_target_layers

__all__ = ["BudgetError", "count_parameters", "lora_budget", "match_budget", "model_dims"]


class BudgetError(ValueError):
    """No size of a method lands close enough to the requested budget."""


def model_dims(model: nn.Module, target_modules=None) -> tuple[dict[str, tuple[int, int]], int]:
    """(layer shapes, embedding width) that the formulas need.

    Args:
        model: a transformers model.
        target_modules: as `AdapterConfig.target_modules` (None: the model type's default).
    Returns:
        ({layer path: (P, Q)}, d_model).
    """
    shapes = find_target_layers(model, target_modules)
    return shapes, model.get_input_embeddings().embedding_dim


def count_parameters(config: AdapterConfig, shapes: dict[str, tuple[int, int]], d_model: int) -> int:
    """Trainable parameters of `config` on layers of these (P, Q) shapes (docs/methods.md; the config's own formula).

    Args:
        config: the method's config.
        shapes: layer path -> (P, Q), input and output width (`model_dims`).
        d_model: the embedding width (OrchMoE's Task Router).
    Returns:
        The count, as a built `RoutedModel` has it.
    """
    return config.count_parameters(shapes, d_model)


def lora_budget(model: nn.Module, rank: int = 8, target_modules=None) -> int:
    """Trainable parameters of a plain LoRA of this rank: the usual reference budget.

    Args:
        model: the base model.
        rank: the LoRA's rank.
        target_modules: the layers adapted (None: the model type's default).
    """
    shapes, d = model_dims(model, target_modules)
    return count_parameters(LoraConfig(rank=rank, target_modules=target_modules), shapes, d)


def match_budget(
    config: AdapterConfig,
    model: nn.Module,
    budget: int,
    *,
    vary: str = "rank",
    tolerance: float = 0.1,
    max_value: int = 256,
) -> AdapterConfig:
    """The config with `vary` (``rank`` or ``n_skills``) set so its count is closest to `budget`.

    Args:
        config: the method and its other settings (``target_modules`` picks the layers counted).
        model: the base model.
        budget: the target count of trainable parameters (e.g. `lora_budget`).
        vary: the integer size field to search.
        tolerance: the largest relative gap accepted, in (0, 1).
        max_value: the largest value of ``vary`` tried (from 1 up).
    Returns:
        A copy of ``config`` with ``vary`` set.
    Raises:
        BudgetError: even the closest size is more than ``tolerance`` away (it names that size), ``vary``
            does not change the count, or invalid numbers.
    """
    _check_numbers(budget, tolerance, max_value)
    names = {f.name for f in dataclasses.fields(config)}
    if vary not in names:
        raise BudgetError(f"{type(config).__name__} has no field {vary!r} to vary; choose from {sorted(names)}")
    shapes, d = model_dims(model, config.target_modules)
    _check_varies(config, vary, shapes, d, max_value)
    best: tuple[float, AdapterConfig, int] | None = None
    for value in range(1, max_value + 1):
        try:
            candidate = config.replace(**{vary: value})
        except ConfigError:
            continue  # e.g. MoDE rank not divisible by expert_rank
        n = count_parameters(candidate, shapes, d)
        gap = abs(n - budget) / budget
        if best is None or gap < best[0]:
            best = (gap, candidate, n)
        if n > budget * (1 + tolerance) and best[0] <= tolerance:
            break
    if best is None or best[0] > tolerance:
        closest = (
            ""
            if best is None
            else f"; the closest is {vary}={getattr(best[1], vary)} with {best[2]:,} parameters ({best[0]:.0%} off)"
        )
        raise BudgetError(
            f"cannot meet a budget of {budget:,} trainable parameters with {config.method} within {tolerance:.0%} "
            f"by varying {vary}{closest}"
        )
    return best[1]


def _check_numbers(budget, tolerance, max_value) -> None:
    """A budget is a finite positive count, a tolerance a finite fraction in (0, 1): NaN would compare false
    everywhere and pick rank 1, infinity would accept any size."""
    if isinstance(budget, bool) or not isinstance(budget, Real) or not math.isfinite(budget) or budget <= 0:
        raise BudgetError(f"budget must be a positive number of parameters, got {budget!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not (0 < tolerance < 1):
        raise BudgetError(f"tolerance must be a relative tolerance in (0, 1), got {tolerance!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 1:
        raise BudgetError(f"max_value must be a positive integer, got {max_value!r}")


def _check_varies(config: AdapterConfig, vary: str, shapes: dict, d: int, max_value: int) -> None:
    """``vary`` must be an integer size that changes the count (not ``alpha``, ``dropout``, ``target_modules``)."""
    counts = set()
    for value in range(1, min(max_value, 8) + 1):
        try:
            counts.add(count_parameters(config.replace(**{vary: value}), shapes, d))
        except (ConfigError, TypeError, ValueError):
            continue
        if len(counts) > 1:
            return
    raise BudgetError(
        f"varying {vary!r} does not change the trainable parameter count of {config.method}; vary a "
        "size such as 'rank' or 'n_skills'"
    )
