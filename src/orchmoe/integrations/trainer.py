"""`RoutedTrainer`: `transformers.Trainer` for a `RoutedModel`, and the mixin TRL's trainers share.

A routed model trains under a plain `Trainer`, but five things go wrong there (issue 10); the mixin
changes exactly those, nothing else:

* **Checkpoints and** ``save_model()`` hold the adapter only (`RoutedModel.save_adapter`: safetensors
  + JSON, the folder `orchmoe.load_adapter` reads). `Trainer` would save ``model.state_dict()``, the
  whole frozen base, which safetensors refuses for tied embeddings (SmolLM2, GPT-2, T5).
* **Resume** (``resume_from_checkpoint``) and ``load_best_model_at_end`` read those folders back. The
  optimizer, scheduler, RNG states and data order are `Trainer`'s own, so a resumed run continues
  the unbroken one exactly.
* **Two-speed optimiser**: `RoutedModel.parameter_groups`, the allocation logits at ``router_lr``
  (default 0.1, as every Poly/MHR reference), everything else at ``args.learning_rate``; the
  optimizer class and its betas/eps come from ``args.optim``. The scheduler scales both alike.
* **Auxiliary losses** (MoLoRA's balance loss) are collected from the forward
  (`RoutedModel.aux_loss_collector`) and added to the trainer's loss scaled as `Trainer` scales the
  LM loss: divided by the accumulation steps when the loss is already normalised over the whole
  accumulated batch, never multiplied by the process count (DDP averages them across processes).
  TRL's SFTTrainer computes its loss from the fused LM head's ``log_probs`` and would drop them.
* **Logs** gain ``aux_loss`` (mean over the window and the processes), ``router_learning_rate`` and
  the routing diagnostics of `orchmoe.core.diagnostics.routing_record` (allocation spread; OrchMoE's
  Task Router entropy, abstract tasks used and, when batches carry ``task_ids``, NMI with the
  task), from this process's batches.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from orchmoe.adapters.folder import AdapterMismatchError, adapter_config_from_meta, read_adapter_config
from orchmoe.core.diagnostics import routing_record
from orchmoe.tuner.model import DEFAULT_ROUTER_LR, RoutedModel

__all__ = ["RoutedTrainer", "RoutedTrainerMixin"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the saved TrainingArguments
_MAX_ROUTING_ROWS = 8192  # pi(x) rows kept per logging window


class RoutedTrainerMixin:
    """What a `transformers.Trainer` subclass needs to train a `RoutedModel` (see the module docstring).

    Put it first among the bases: ``class MyTrainer(RoutedTrainerMixin, SomeTrainer)``.

    Args:
        *args, **kwargs: the trainer's own (``model`` must be a `RoutedModel`, else TypeError).
        router_lr: learning rate of the allocation logits; None: ``args.learning_rate``.
    """

    def __init__(self, *args: Any, router_lr: float | None = DEFAULT_ROUTER_LR, **kwargs: Any) -> None:
        self.router_lr = router_lr
        self._aux_window: list[torch.Tensor] = []
        self._routing_window: tuple[list[torch.Tensor], list[torch.Tensor | None]] = ([], [])
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, RoutedModel):
            raise TypeError(
                f"{type(self).__name__} trains a RoutedModel (orchmoe.get_model(base, config)), got "
                f"{type(self.model).__name__}"
            )

    @property
    def routed_model(self) -> RoutedModel:
        """The `RoutedModel` being trained (unwrapped from DDP and the like)."""
        return self.accelerator.unwrap_model(self.model)

    # -- optimiser -------------------------------------------------------------------------------
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """``args.optim``'s optimizer over `RoutedModel.parameter_groups` (two learning rates).

        Args:
            model: unused (`Trainer`'s signature); the groups are `routed_model`'s.
        Returns:
            The optimizer, also ``self.optimizer`` (an existing one is returned as it is).
        Raises:
            ValueError: an ``optim`` that manages its parameters itself (not a ``torch.optim.Optimizer``).
        """
        if self.optimizer is not None:
            return self.optimizer
        routed = self.routed_model
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, routed)
        kwargs = dict(kwargs)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {
            "params",
            "model",
            "optimizer_dict",
        } & set(kwargs):
            raise ValueError(
                f"{type(self).__name__} builds its own two-speed parameter groups; optim={self.args.optim!r} "
                "manages its parameters itself: use a torch optimizer (adamw_torch, sgd, ...) or pass "
                "optimizers=(optimizer, scheduler)"
            )
        groups = routed.parameter_groups(
            lr=self.args.learning_rate, router_lr=self.router_lr, weight_decay=self.args.weight_decay
        )
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(
        self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The parent's loss plus the auxiliary losses of its forward(s), scaled as the parent's loss is.

        Args:
            model, inputs, return_outputs, num_items_in_batch: as `transformers.Trainer.compute_loss`.
        Returns:
            The loss (a scalar tensor), or ``(loss, outputs)`` with ``return_outputs``; in evaluation mode
            the parent's result unchanged.
        """
        routed = self.routed_model
        with routed.aux_loss_collector() as aux:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not routed.training:
            return result
        self._remember_routing(routed, inputs)
        if not aux:
            return result
        loss, outputs = result if return_outputs else (result, None)
        total = torch.stack([a.to(loss.device) for a in aux]).sum()
        scale = 1.0 / self._accumulation_steps() if self._loss_scaled_for_ga(num_items_in_batch) else 1.0
        loss = loss + (total * scale).to(loss.dtype)
        self._aux_window.append(total.detach().float())
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether `Trainer.training_step` will leave this loss undivided by the accumulation steps (its rule)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _accumulation_steps(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

    # -- logging ---------------------------------------------------------------------------------
    def _remember_routing(self, routed: RoutedModel, inputs: dict) -> None:
        pi = routed.routing_state.task_probs
        if pi is None:
            return
        pis, tasks = self._routing_window
        pis.append(pi.detach())
        task_ids = inputs.get("task_ids")
        tasks.append(task_ids.detach().reshape(-1) if isinstance(task_ids, torch.Tensor) else None)
        while sum(p.shape[0] for p in pis) > _MAX_ROUTING_ROWS and len(pis) > 1:
            pis.pop(0), tasks.pop(0)

    def routing_logs(self, learning_rate: float | None = None) -> dict[str, float]:
        """The window's auxiliary loss, the router learning rate and the routing diagnostics; resets the window.
        Called on every process at each training log (the auxiliary loss is averaged across them).

        Args:
            learning_rate: the logged learning rate of the experts; the router's is reported at the same point
                of the schedule (both groups follow one schedule, each from its own initial rate).
        Returns:
            ``aux_loss``, ``router_learning_rate`` and the `orchmoe.core.diagnostics.routing_record` fields, each
            only when it applies.
        """
        out: dict[str, float] = {}
        if self._aux_window:
            aux = torch.stack(self._aux_window).mean()
            out["aux_loss"] = float(self.accelerator.reduce(aux, "mean"))  # a collective: every process logs
            self._aux_window.clear()
        groups = {g.get("name"): g for g in self.optimizer.param_groups} if self.optimizer is not None else {}
        if "allocation" in groups and "experts" in groups:
            alloc, experts = groups["allocation"], groups["experts"]
            ratio = alloc.get("initial_lr", alloc["lr"]) / max(experts.get("initial_lr", experts["lr"]), 1e-30)
            out["router_learning_rate"] = float((experts["lr"] if learning_rate is None else learning_rate) * ratio)
        pis, tasks = self._routing_window
        task_ids = torch.cat(tasks) if tasks and all(t is not None for t in tasks) else None
        out.update(routing_record(self.routed_model, torch.cat(pis) if pis else None, task_ids))
        pis.clear(), tasks.clear()
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The parent's ``log``, a training log (not an evaluation's) extended with `routing_logs`."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):  # a training log
            logs = {**logs, **self.routing_logs(logs.get("learning_rate"))}
        super().log(logs, *args, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter folder (plus the tokenizer and training arguments, as `Trainer` saves them)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        routed = self.routed_model
        routed.save_adapter(output_dir, metadata=getattr(routed, "adapter_metadata", None))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Adapter weights (and the Task Router's statistics) from a checkpoint this trainer wrote."""
        routed = self.accelerator.unwrap_model(model) if model is not None else self.routed_model
        try:
            meta = read_adapter_config(resume_from_checkpoint)
        except FileNotFoundError:
            raise ValueError(
                f"{resume_from_checkpoint} holds no orchmoe adapter (adapter_config.json): not a "
                f"checkpoint of {type(self).__name__}"
            ) from None
        saved, ours = adapter_config_from_meta(meta, resume_from_checkpoint).to_dict(), routed.adapter_config.to_dict()
        if saved != ours:
            diff = {
                k: (saved.get(k), ours.get(k)) for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)
            }
            raise AdapterMismatchError(
                f"checkpoint {resume_from_checkpoint} holds an adapter with other settings than "
                f"the model being trained (checkpoint vs model: {diff})"
            )
        routed.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class RoutedTrainer(RoutedTrainerMixin, Trainer):
    """`transformers.Trainer` for a `RoutedModel`: adapter-only checkpoints, exact resume, the two-speed
    optimiser, auxiliary losses and routing diagnostics in the logs, DDP (see `orchmoe.integrations.trainer`).

    Args:
        *args, **kwargs: `transformers.Trainer`'s (``model`` is the `RoutedModel`).
        router_lr: learning rate of the allocation logits (Poly/MHR Z, OrchMoE W_skill); None: ``args.learning_rate``.
    """
