"""Routers: what decides each input's mixture of skills.

A `ModelRouter` decides every adapted layer's allocation at once from what is known before the
forward (parameter mixing: LoRA, Poly/MHR, OrchMoE); a `LayerRouter` gates each token inside one
layer (output mixing: MoLoRA, MoDE). Importing this package registers every method.
"""

from orchmoe.core.routers.allocation import ConstantRouter, PolyRouter, logistic_noise, relaxed_allocation
from orchmoe.core.routers.base import LayerRouter, ModelRouter, Route, RoutingInputs
from orchmoe.core.routers.task import OrchMoERouter, SkillRouter, TaskRouter
from orchmoe.core.routers.token import TokenRouter

__all__ = [
    "ConstantRouter",
    "LayerRouter",
    "ModelRouter",
    "OrchMoERouter",
    "PolyRouter",
    "Route",
    "RoutingInputs",
    "SkillRouter",
    "TaskRouter",
    "TokenRouter",
    "logistic_noise",
    "relaxed_allocation",
]
