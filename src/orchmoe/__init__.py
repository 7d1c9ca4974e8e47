"""orchmoe: multi-task parameter-efficient fine-tuning with routed mixtures of LoRA experts."""

__version__ = "0.2.0"

from . import routers  # noqa: E402,F401  (registers every method)
from .budget import BudgetError, count_parameters, lora_budget, match_budget  # noqa: E402
from .config import (  # noqa: E402
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
from .hub import HubError  # noqa: E402
from .layer import RoutedLoraLayer  # noqa: E402
from .model import AdapterMismatchError, RoutedModel, get_model, load_adapter  # noqa: E402
from .peft_interop import from_peft_config, init_from_peft_lora  # noqa: E402
from .registry import register_method  # noqa: E402
from .routing import RoutingError  # noqa: E402

__all__ = [
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
        from .integrations.trainer import RoutedTrainer

        return RoutedTrainer
    raise AttributeError(f"module 'orchmoe' has no attribute {name!r}")
