"""orchmoe: multi-task parameter-efficient fine-tuning with routed mixtures of LoRA experts."""

from orchmoe.adapters.hub import HubError
from orchmoe.adapters.peft_lora import from_peft_config, init_from_peft_lora
from orchmoe.core import routers  # noqa: F401  (importing the routers registers every method)
from orchmoe.core.budget import BudgetError, count_parameters, lora_budget, match_budget
from orchmoe.core.config import (
    METHODS,
    AdapterConfig,
    ConfigError,
    LoraConfig,
    MHRConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    PolyConfig,
    config_from_dict,
)
from orchmoe.core.layer import RoutedLoraLayer
from orchmoe.core.registry import register_method
from orchmoe.core.routing import RoutingError
from orchmoe.tuner.model import AdapterMismatchError, RoutedModel, get_model, load_adapter
from orchmoe.version import __version__

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterMismatchError",
    "BudgetError",
    "ConfigError",
    "HubError",
    "LoraConfig",
    "METHODS",
    "MHRConfig",
    "MoDEConfig",
    "MoLoRAConfig",
    "OrchMoEConfig",
    "PolyConfig",
    "RoutedLoraLayer",
    "RoutedModel",
    "RoutedTrainer",
    "RoutingError",
    "config_from_dict",
    "count_parameters",
    "from_peft_config",
    "get_model",
    "init_from_peft_lora",
    "load_adapter",
    "lora_budget",
    "match_budget",
    "register_method",
]


def __getattr__(name: str):
    """`RoutedTrainer` imports `transformers.Trainer` (and its training stack) only when asked for."""
    if name == "RoutedTrainer":
        from orchmoe.integrations.trainer import RoutedTrainer

        return RoutedTrainer
    raise AttributeError(f"module 'orchmoe' has no attribute {name!r}")
