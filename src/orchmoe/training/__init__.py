"""Training a routed adapter with the Hugging Face stack: the two-speed optimiser and the Trainer callbacks.

What a plain `transformers.Trainer` (or `trl.SFTTrainer`) needs beyond a PEFT model, as parts it takes
through its own arguments: ``optimizer_cls_and_kwargs=(RoutedAdamW, {...})`` for the reference learning rates
of the allocation logits, and `RoutingCallback` for the routing diagnostics in the logs.
"""

from orchmoe.training.callbacks import (
    NonFiniteLossCallback,
    NonFiniteLossError,
    RoutingCallback,
    add_routing_callbacks,
)
from orchmoe.training.collator import RoutedDataCollator
from orchmoe.training.optim import RoutedAdamW, create_routed_optimizer, parameter_groups, routed_tuner

__all__ = [
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "RoutedAdamW",
    "RoutedDataCollator",
    "RoutingCallback",
    "add_routing_callbacks",
    "create_routed_optimizer",
    "parameter_groups",
    "routed_tuner",
]
