"""The method registry: each method is a config dataclass paired once with its router class.

A router module registers itself for the configs it serves::

    @register_method(PolyConfig)
    @register_method(MHRConfig)
    class PolyRouter(ModelRouter): ...

and everything else (the model, budgets, export, analysis, the recipe, serving) asks the config or the
router instead of testing which class a config is.

Adding a method, the whole checklist (``tests/core/test_registry.py`` does it with a toy method and runs
it through the command line, the analysis and the export):

1. **A config**: a dataclass subclassing `orchmoe.core.config.AdapterConfig` with ``method`` (its name),
   ``routing`` (what its router reads: ``"none"``, ``"tokens"``, ``"task_ids"`` or ``"prompt"``),
   ``small_fields`` (a small instance: the test suite builds every method from it), its own fields
   declared with ``option(default, help)`` (the command line's flags and the docs' table come from them),
   and what differs from the base: ``n_experts``, ``layer_parameters``/``model_parameters`` (its
   trainable-parameter count), ``for_tasks`` (fields set from the number of training tasks) and
   ``validate`` (its own checks).
2. **A router**: a `orchmoe.core.routers.ModelRouter` (one allocation per example, parameter mixing)
   or `orchmoe.core.routers.LayerRouter` (per-token gates, output mixing) with ``from_config``; a
   model router that learns a task-skill allocation exposes it through ``allocation_matrices()``
   (the analysis and the export ask for it).
3. **One line**: ``@register_method(MyConfig)`` above the router class, in a module that is imported
   (the built-in routers: `orchmoe.core.routers`; a plug-in: any module imported before use).

Nothing else: PEFT's method registry (`orchmoe.tuner.registration`, through `on_register`), the
command line's options (`orchmoe.recipe.args.method_arguments`), the tests (``tests/core_helpers.py``),
the docs' options table (``python scripts/docs_methods.py``), analysis, export and serving all read
this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "METHODS",
    "ROUTERS",
    "register_method",
    "config_class",
    "router_class",
    "on_register",
    "UnknownMethodError",
]

#: method name -> config class (``orchmoe.METHODS``)
METHODS: dict[str, type] = {}
#: method name -> router class
ROUTERS: dict[str, type] = {}
#: called with (name, config class, router class) for every method registered, also for those registered before
#: the listener was added (`on_register`): how the layers above (PEFT's method registry) learn of a new method
_LISTENERS: list[Callable[[str, type, type], None]] = []


class UnknownMethodError(ValueError):
    """A method name that no registered config answers to."""


def register_method(config_cls: type) -> Callable[[type], type]:
    """Class decorator pairing ``config_cls`` (its ``method`` name) with the decorated router class."""
    name = getattr(config_cls, "method", "")
    if not name:
        raise TypeError(f"{config_cls.__name__} has no method name")

    def deco(router_cls: type) -> type:
        if name in METHODS and METHODS[name] is not config_cls:
            raise TypeError(f"method {name!r} is already registered to {METHODS[name].__name__}")
        new = name not in METHODS
        METHODS[name] = config_cls
        ROUTERS[name] = router_cls
        if new:
            for listener in _LISTENERS:
                listener(name, config_cls, router_cls)
        return router_cls

    return deco


def on_register(listener: Callable[[str, type, type], None]) -> None:
    """Call ``listener(name, config_cls, router_cls)`` for every registered method, now and on later registrations."""
    _LISTENERS.append(listener)
    for name, config_cls in list(METHODS.items()):
        listener(name, config_cls, ROUTERS[name])


def config_class(name: Any) -> type:
    """The config class of a method name; a clear error naming the valid ones."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def router_class(config: Any) -> type:
    """The router class registered for a config instance."""
    return ROUTERS[config.method]
