"""The two-speed optimiser of the Poly/MHR references, for any trainer.

The task-skill allocation logits (Poly/MHR Z, OrchMoE W_skill) learn at ``router_lr`` (0.1 in every
reference config, 100x the adapters' 1e-3); experts and the dense routers (OrchMoE's Task Router, the
MoLoRA/MoDE token routers) at ``lr``. A dense projection of a d-wide input at the fast rate would move every
logit by ~d * router_lr per Adam step and collapse the routing, hence three groups.

With `transformers.Trainer` (or TRL's trainers, also when they build the PEFT model from ``peft_config=``)
it is one argument: ``optimizer_cls_and_kwargs=(RoutedAdamW, {"lr": 1e-3, "router_lr": 0.1})``; the Trainer
calls the factory with the model it trains. ``optimizers=(create_routed_optimizer(model, ...), None)`` is the
same for a model built beforehand (as PEFT's ``create_loraplus_optimizer``).
"""

from __future__ import annotations

from typing import Any

import torch

from orchmoe.tuner.model import DEFAULT_ROUTER_LR

__all__ = ["DEFAULT_ROUTER_LR", "RoutedAdamW", "create_routed_optimizer", "parameter_groups", "routed_tuner"]


def routed_tuner(model: Any) -> Any:
    """orchmoe's tuner inside ``model`` (a PeftModel, a DDP-wrapped one, or the tuner itself)."""
    seen = model
    for _ in range(4):
        if "routing_state" in vars(seen):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None)
        if seen is None:
            break
    raise TypeError(f"{type(model).__name__} is not an orchmoe model (build it with orchmoe.get_model)")


def parameter_groups(
    model: Any, lr: float = 1e-3, router_lr: float | None = DEFAULT_ROUTER_LR, weight_decay: float = 0.0
) -> list[dict]:
    """The optimiser groups ``experts``, ``allocation`` and ``routers`` of a routed model's trainable parameters.

    Args:
        model: the PeftModel (or its tuner).
        lr: learning rate of the experts and dense routers.
        router_lr: learning rate of the allocation logits (None: ``lr``).
        weight_decay: AdamW weight decay of the experts (routers get none).
    Returns:
        ``torch.optim`` parameter groups, each with its ``name``.
    """
    return routed_tuner(model).parameter_groups(lr=lr, router_lr=router_lr, weight_decay=weight_decay)


def create_routed_optimizer(
    model: Any,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float = 1e-3,
    router_lr: float | None = DEFAULT_ROUTER_LR,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over `parameter_groups` (for ``Trainer(optimizers=(optimizer, None))``).

    Args:
        model: the PeftModel built by `orchmoe.get_model` (or ``peft.get_peft_model``).
        optimizer_cls: a ``torch.optim.Optimizer`` class.
        lr, router_lr, weight_decay: as `parameter_groups`.
        **optimizer_kwargs: the optimizer's own (betas, eps, ...).
    """
    return optimizer_cls(parameter_groups(model, lr, router_lr, weight_decay), **optimizer_kwargs)


class RoutedAdamW:
    """An optimizer factory `transformers.Trainer` calls with the model it trains (``optimizer_cls_and_kwargs``).

    ``Trainer(..., optimizer_cls_and_kwargs=(RoutedAdamW, {"lr": 1e-3, "router_lr": 0.1}))``: AdamW over
    `parameter_groups`; keys other than ``lr``, ``router_lr`` and ``weight_decay`` go to ``torch.optim.AdamW``.
    """

    def __call__(self, model: Any, **kwargs: Any) -> torch.optim.Optimizer:
        lr = kwargs.pop("lr", 1e-3)
        router_lr = kwargs.pop("router_lr", DEFAULT_ROUTER_LR)
        weight_decay = kwargs.pop("weight_decay", 0.0)
        return create_routed_optimizer(
            model, torch.optim.AdamW, lr=lr, router_lr=router_lr, weight_decay=weight_decay, **kwargs
        )
