"""The adapter of a run, from the ``adapter`` section of its options and the chosen method's own config
dataclass: values coerced by the method's field types, validated by its dataclass, fitted to the run's
task count and, with ``--budget-rank``, sized to a LoRA budget. A new method or option needs no change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from orchmoe.core.budget import BudgetError, lora_budget, match_budget
from orchmoe.core.config import AdapterConfig, ConfigError
from orchmoe.core.registry import METHODS
from orchmoe.recipe.options import RECIPE_SET, TrainConfig, TrainConfigError, coerce_value, parse_target_modules

__all__ = ["build_adapter_config"]


def _method_kwargs(cfg: TrainConfig, cls: type[AdapterConfig]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in cfg.adapter.items():
        if v is None:  # not set: the method's default (a 0.1 config.yaml lists every option, unset ones as null)
            continue
        if k not in fields:
            owners = sorted(m for m, c in METHODS.items() if k in {f.name for f in dataclasses.fields(c)})
            where = f" (an option of {', '.join(owners)})" if owners else ""
            valid = sorted(set(fields) - set(RECIPE_SET))
            raise TrainConfigError(f"method {cfg.method!r} has no option {k!r}{where}; its options: {valid}")
        v = (
            parse_target_modules(f"adapter.{k}", v)
            if k == "target_modules"
            else coerce_value(fields[k], v, f"adapter.{k}")
        )
        if v is not None:
            kwargs[k] = v
    return kwargs


def build_adapter_config(cfg: TrainConfig, base_model, n_tasks: int) -> AdapterConfig:
    """The method's config from the adapter section, fitted to ``n_tasks`` training tasks; with
    ``budget_rank``, sized to a LoRA-r budget by `match_budget`. ``base_model=None`` only checks the
    options (before anything slow is loaded)."""
    cls = METHODS[cfg.method]
    kwargs = _method_kwargs(cfg, cls)
    try:
        adapter = cls(**kwargs).for_tasks(n_tasks, explicit=set(kwargs))
        if cfg.budget_rank is not None and base_model is not None:
            budget = lora_budget(base_model, cfg.budget_rank, adapter.target_modules)
            adapter = match_budget(adapter, base_model, budget, vary=cfg.budget_vary, tolerance=cfg.budget_tolerance)
    except (ConfigError, BudgetError) as e:
        raise TrainConfigError(str(e)) from None
    return adapter
