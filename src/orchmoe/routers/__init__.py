"""Routers: what decides each input's mixture of skills.

Per-layer routers return either per-example allocation weights
(``mixing == "params"``: parameter mixing, shape (b, h, S)) or per-token gates
(``mixing == "tokens"``: output mixing, shape (b, n, k, S)).
The OrchMoE `TaskRouter` is one per model and feeds every `SkillRouter`.
"""
from .allocation import PolyRouter, SkillRouter, relaxed_allocation
from .constant import ConstantRouter
from .task import TaskRouter
from .token import TokenRouter

__all__ = ["ConstantRouter", "PolyRouter", "SkillRouter", "TaskRouter", "TokenRouter", "relaxed_allocation"]
