"""`RoutedSFTTrainer`: TRL's `SFTTrainer` for a `RoutedModel`.

A plain ``trl.SFTTrainer(model=routed_model, ...)`` already trains a routed model: every call routes
first (`orchmoe.tuner.calls`), also through the fused LM head TRL installs (it calls ``model.base_model``,
the transformers backbone, then ``model.get_output_embeddings()``). It lacks what `RoutedTrainer`
adds: its checkpoints are the whole model's ``state_dict()`` (refused for tied embeddings), one
learning rate for every parameter, and its loss comes from the fused ``log_probs``, so MoLoRA's
balance loss is dropped (with a warning). This class is ``SFTTrainer`` with `RoutedTrainerMixin`.
"""

from __future__ import annotations

from trl import SFTTrainer

from orchmoe.integrations.trainer import RoutedTrainerMixin

__all__ = ["RoutedSFTTrainer"]


class RoutedSFTTrainer(RoutedTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` with adapter-only checkpoints, exact resume, the two-speed optimiser and the
    auxiliary losses added to its loss (see `orchmoe.integrations.trainer`).

    Args:
        *args, **kwargs: `trl.SFTTrainer`'s (``model`` is the `RoutedModel`, ``processing_class`` its tokenizer).
        router_lr: learning rate of the allocation logits; None: ``args.learning_rate``.
    """
