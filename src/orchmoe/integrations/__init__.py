"""orchmoe in the Hugging Face training tools: `RoutedTrainer` (transformers), `RoutedSFTTrainer` (TRL).

Imported lazily: ``import orchmoe`` does not load the training stack (or TRL).
"""

from __future__ import annotations

__all__ = ["RoutedSFTTrainer", "RoutedTrainer", "RoutedTrainerMixin"]


def __getattr__(name: str):
    if name in ("RoutedTrainer", "RoutedTrainerMixin"):
        from orchmoe.integrations import trainer

        return getattr(trainer, name)
    if name == "RoutedSFTTrainer":
        from orchmoe.integrations.trl import RoutedSFTTrainer

        return RoutedSFTTrainer
    raise AttributeError(f"module 'orchmoe.integrations' has no attribute {name!r}")
