"""`transformers.TrainerCallback`s for routed adapters: what a plain Trainer logs, and a stop on a non-finite loss.

`RoutingCallback` adds to every training log (the Trainer's names, so trackers show ``train/...``): the
auxiliary loss (MoLoRA's balance loss, OrchMoE's balance term; only for a method that has one), the learning
rate of the allocation logits (``router_learning_rate``), and what the routers do: the allocation spread,
OrchMoE's pi entropy, the number of abstract tasks in use and, when the batches say which task each example
is, the NMI of the Task Router's argmax with the tasks. It reads the tensors kept on the device by the
model (no host sync between logs).

`NonFiniteLossCallback` stops training with an error naming the steps and the likely cause when the loss
or the adapter becomes NaN or infinite (checked at each log and before each checkpoint is written, so no
checkpoint or final adapter holding NaN is ever saved).

A callback mutates the Trainer's log record, which only the callbacks after it see: `add_routing_callbacks`
puts both first. ``Trainer(..., callbacks=[RoutingCallback()])`` works too; trackers then miss its fields
(``trainer_state.json`` and the callbacks after it have them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from orchmoe.core.diagnostics import routing_record
from orchmoe.training.optim import routed_tuner

__all__ = ["NonFiniteLossCallback", "NonFiniteLossError", "RoutingCallback", "add_routing_callbacks"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or adapter weight); nothing non-finite was saved."""


class RoutingCallback(TrainerCallback):
    """The auxiliary loss, the router learning rate and the routing diagnostics in every training log."""

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        tuner = routed_tuner(model)
        if tuner.routing_window is None:
            tuner.routing_window = ([], [])

    def on_step_end(self, args, state, control, **kwargs) -> None:
        """The last step is always logged: the routing a run ends with is in its logs."""
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs) -> None:
        if logs is None or "loss" not in logs or model is None:  # an evaluation's log, or the final summary
            return
        extra = routing_logs(routed_tuner(model), optimizer, logs.get("learning_rate"))
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def routing_logs(tuner: Any, optimizer: Any = None, learning_rate: float | None = None) -> dict[str, float]:
    """The window's auxiliary loss, the router learning rate and the routing diagnostics; empties the window.

    Args:
        tuner: the routed model (`orchmoe.tuner.model.RoutedModel`).
        optimizer: the trainer's optimizer (its group named ``allocation`` gives the router learning rate).
        learning_rate: the logged rate of the experts (the router's is reported at the same point of the schedule).
    """
    out: dict[str, float] = {}
    if tuner.aux_window:
        aux = torch.stack([a.float() for a in tuner.aux_window]).mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(aux)
            aux = aux / torch.distributed.get_world_size()
        out["aux_loss"] = float(aux)
        tuner.aux_window.clear()
    groups = {g.get("name"): g for g in getattr(optimizer, "param_groups", [])}
    if "allocation" in groups and "experts" in groups:
        alloc, experts = groups["allocation"], groups["experts"]
        ratio = alloc.get("initial_lr", alloc["lr"]) / max(experts.get("initial_lr", experts["lr"]), 1e-30)
        out["router_learning_rate"] = float((experts["lr"] if learning_rate is None else learning_rate) * ratio)
    pis, labels = tuner.routing_window if tuner.routing_window is not None else ([], [])
    task_ids = torch.cat(labels) if labels and all(t is not None for t in labels) else None
    out.update(routing_record(tuner, torch.cat(pis) if pis else None, task_ids))
    out.pop("pi_entropy_max", None)  # a constant, log K: not a series
    pis.clear(), labels.clear()
    return out


class NonFiniteLossCallback(TrainerCallback):
    """Stops training with `NonFiniteLossError` as soon as a logged loss or the adapter is NaN or infinite.

    Needs ``logging_nan_inf_filter=False`` (the recipe sets it): with the Trainer's default filter a NaN loss
    is replaced in the logs by the running average and training goes on.
    """

    def __init__(self) -> None:
        self.last_good_step = 0

    def on_log(self, args, state, control, logs=None, model=None, **kwargs) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(self._message(args, state, f"the training loss became {loss}"))
        if loss is not None:
            self.last_good_step = state.global_step

    def on_save(self, args, state, control, model=None, **kwargs) -> None:
        """Runs after a checkpoint is written: a non-finite adapter stops the run before it is resumed from or
        kept (the recipe never resumes from a checkpoint whose adapter is not finite)."""
        bad = non_finite_parameters(model)
        if bad:
            raise NonFiniteLossError(self._message(args, state, f"the adapter holds NaN/inf ({bad[0]})"))

    def _message(self, args, state, what: str) -> str:
        cause = (
            f"the learning rate ({args.learning_rate:g}) is likely too high for this model"
            if not (args.fp16 or args.bf16)
            else f"the learning rate ({args.learning_rate:g}) or {'fp16' if args.fp16 else 'bf16'} overflow"
        )
        return (
            f"{what} between steps {self.last_good_step} and {state.global_step}: {cause}; lower --lr (or "
            "--router-lr) or raise --max-grad-norm clipping. Nothing non-finite was saved as the result"
        )


def non_finite_parameters(model: Any) -> list[str]:
    """Names of the adapter's tensors holding NaN or inf (a host sync per tensor: for saves, not steps)."""
    if model is None:
        return []
    tuner = routed_tuner(model)
    with torch.no_grad():
        return [n for n, p in tuner.adapter_state_dict().items() if not bool(torch.isfinite(p).all())]


def add_routing_callbacks(trainer: Any, *, stop_on_non_finite: bool = True) -> Any:
    """Put `RoutingCallback` (and `NonFiniteLossCallback`) first among ``trainer``'s callbacks, so the trackers
    see their fields; turns the Trainer's NaN filtering of logged losses off when stopping on them. Returns it."""
    handler = trainer.callback_handler
    if stop_on_non_finite:
        trainer.args.logging_nan_inf_filter = False
        handler.callbacks.insert(0, NonFiniteLossCallback())
    handler.callbacks.insert(0, RoutingCallback())
    return trainer
