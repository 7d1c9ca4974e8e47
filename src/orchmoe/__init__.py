"""orchmoe: multi-task parameter-efficient fine-tuning with routed mixtures of LoRA experts."""

from orchmoe.adapters.folder import AdapterMismatchError, load_adapter, save_adapter
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
from orchmoe.training.optim import RoutedAdamW, create_routed_optimizer, parameter_groups
from orchmoe.tuner.build import get_model
from orchmoe.tuner.calls import accept_task_ids
from orchmoe.tuner.model import RoutedModel
from orchmoe.tuner.registration import register_all
from orchmoe.version import __version__

register_all()  # every orchmoe method is a PEFT method from here on

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterMismatchError",
    "BudgetError",
    "ConfigError",
    "LoraConfig",
    "METHODS",
    "MHRConfig",
    "MoDEConfig",
    "MoLoRAConfig",
    "OrchMoEConfig",
    "PolyConfig",
    "RoutedAdamW",
    "RoutedLoraLayer",
    "RoutedModel",
    "RoutingError",
    "accept_task_ids",
    "config_from_dict",
    "count_parameters",
    "create_routed_optimizer",
    "from_peft_config",
    "get_model",
    "init_from_peft_lora",
    "load_adapter",
    "lora_budget",
    "match_budget",
    "parameter_groups",
    "register_method",
    "save_adapter",
]
