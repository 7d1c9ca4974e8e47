"""``orchmoe train``: the script a Hugging Face user would write, with the run folder around it.

A PEFT model (`orchmoe.get_model`), a tokenised ``datasets.Dataset``, and a plain `transformers.Trainer` with
the library's parts (`orchmoe.training`: the two-speed optimiser factory, the routing and non-finite-loss
callbacks, the collator) plus the recipe's two callbacks (the log file, verified checkpoints,
`orchmoe.recipe.callbacks`). Around it: the run folder is claimed and locked, a killed run resumes from its
newest intact checkpoint (the Trainer restores adapter, optimizer, scheduler, RNG and data position), the
final adapter is written as one unit with its prompt format and tasks, and the run is evaluated by
generation with the official scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import os
import shutil
import time
from typing import Any

from orchmoe.core.budget import BudgetError, lora_budget, match_budget
from orchmoe.core.config import ConfigError
from orchmoe.loading import is_encoder_decoder, load_model_and_tokenizer
from orchmoe.recipe.args import RESUME_FREE, ArgumentsError, OrchmoeTrainingArguments, adapter_config
from orchmoe.recipe.callbacks import CheckpointCallback, RunLogCallback
from orchmoe.recipe.launch import check_launch
from orchmoe.recipe.parse import RunOptions
from orchmoe.recipe.run_data import build_data, prompt_format, run_metadata, train_features
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.utils.fileio import DiskFullError, is_disk_full, path_kind, reporting_disk_full
from orchmoe.version import __version__

__all__ = ["options_record", "train"]

#: TrainingArguments fields the recipe sets itself (not options of the run, not written to config.yaml)
_INTERNAL = {
    "remove_unused_columns",
    "eval_strategy",
    "use_cpu",
    "logging_dir",
    "logging_nan_inf_filter",
    "save_safetensors",
    "ddp_broadcast_buffers",
    "save_strategy",
    "mixed_precision",
    "debug",
    "dataloader_pin_memory",
    "activation_checkpointing",
}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def options_record(options: RunOptions) -> dict[str, Any]:
    """The run's options as a flat mapping ``--config`` reads back (config.yaml): every recipe option, the method's
    options that were set, and the TrainingArguments that differ from their defaults or that the recipe sets."""
    out: dict[str, Any] = {}
    for group in (options.model, options.data, options.eval):
        out.update({f.name: _plain(getattr(group, f.name)) for f in dataclasses.fields(group)})
    out.pop("overwrite", None)  # an action of that invocation, not a setting to replay
    out.update({k: v for k, v in dataclasses.asdict(options.adapter).items() if v is not None})
    own = {f.name for f in dataclasses.fields(OrchmoeTrainingArguments) if f.name in OrchmoeTrainingArguments.__dict__}
    for f in dataclasses.fields(options.training):
        value = _plain(getattr(options.training, f.name))
        if f.name in _INTERNAL or not isinstance(value, (str, int, float, bool, list, type(None))):
            continue
        if f.name in own or (f.default is not dataclasses.MISSING and value != _plain(f.default)):
            out[f.name] = value
    if out.get("save_steps") and options.training.save_strategy == "no":
        out["save_steps"] = 0
    return out


def _prepare_folder(run: RunFolder, options: RunOptions, record: dict, state) -> Any:
    """Claim the run folder (main process), decide between a fresh start and a resume (every process alike)."""
    run.check_out()  # a bad --out fails alike on every process
    if state.is_main_process:
        run.claim()
    state.wait_for_everyone()
    plan = run.plan(record, options.eval.resume, options.eval.overwrite, RESUME_FREE)
    state.wait_for_everyone()
    if state.is_main_process:
        run.apply(plan)
        if plan.resume_from is not None:
            run.truncate_log(int(plan.resume_from.name.split("-")[1]))
    state.wait_for_everyone()
    return plan


def _build_model(options: RunOptions, data, training: OrchmoeTrainingArguments):
    """The base model, its tokenizer, and the PEFT model of the chosen method fitted to the data (and budget)."""
    from transformers import set_seed

    from orchmoe.tuner.build import get_model

    base, tokenizer, info = load_model_and_tokenizer(
        options.model.model, dtype=options.model.dtype, device=training.device
    )
    cfg = adapter_config(options.model.method, options.adapter, data.num_tasks)
    if options.model.budget_rank is not None:
        if options.model.budget_vary in {k for k, v in dataclasses.asdict(options.adapter).items() if v is not None}:
            raise ArgumentsError(f"--budget-rank varies {options.model.budget_vary}: do not also set it")
        try:
            budget = lora_budget(base, options.model.budget_rank, cfg.target_modules)
            cfg = match_budget(
                cfg, base, budget, vary=options.model.budget_vary, tolerance=options.model.budget_tolerance
            )
        except (ConfigError, BudgetError) as e:
            raise ArgumentsError(str(e)) from None
    set_seed(training.seed)  # adapter initialisation: identical on every process
    model = get_model(
        base, cfg, base_model_name=info["name"], base_model_source=info["source"], init_lora=options.model.init_lora
    )
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer, info


def _trainer(options: RunOptions, model, tokenizer, features, run: RunFolder, record: dict, resolved: dict):
    from transformers import Trainer

    from orchmoe.training import RoutedAdamW, RoutedDataCollator, add_routing_callbacks

    training = options.training
    cfg = model.peft_config["default"]
    collator = RoutedDataCollator(
        tokenizer.pad_token_id,
        decoder_only=not is_encoder_decoder(model.get_base_model()),
        routes_by_task=cfg.needs_task_ids,
    )
    router_lr = training.router_lr if training.router_lr is not None else training.learning_rate
    optim = (
        RoutedAdamW,
        {
            "lr": training.learning_rate,
            "router_lr": router_lr,
            "weight_decay": training.weight_decay,
            "betas": (training.adam_beta1, training.adam_beta2),
            "eps": training.adam_epsilon,
            # the Trainer's default (adamw_torch_fused) where torch has the fused kernel for the device
            "fused": str(getattr(training.optim, "value", training.optim)) == "adamw_torch_fused"
            and model.get_base_model().device.type == "cuda",
        },
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=features,
        data_collator=collator,
        optimizer_cls_and_kwargs=optim,
        callbacks=[RunLogCallback(run), CheckpointCallback(run, record, resolved)],
    )
    return add_routing_callbacks(trainer)


def _configure(training: OrchmoeTrainingArguments) -> None:
    training.logging_nan_inf_filter = False  # a NaN loss must stop the run (NonFiniteLossCallback), not be hidden
    training.ddp_broadcast_buffers = False  # the Task Router's statistics are kept equal by their own all-reduce
    if training.disable_tqdm:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:  # optional on the training path (the features are then computed in memory)
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


@contextlib.contextmanager
def _trackers_in(run: RunFolder):
    """The trackers' files inside the run folder (TensorBoard would write runs/<date>, mlflow ./mlruns in the working
    directory, wandb ./wandb), unless the user set where; the environment restored afterwards."""
    wanted = {
        "TENSORBOARD_LOGGING_DIR": str((run / RunFolder.LOGS).resolve()),
        "MLFLOW_TRACKING_URI": f"file://{(run / 'mlruns').resolve()}",  # a file store (mlflow-skinny has no sqlite)
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "WANDB_DIR": str(run.path.resolve()),
    }
    if "MLFLOW_TRACKING_URI" in os.environ:
        wanted.pop("MLFLOW_ALLOW_FILE_STORE")
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def train(options: RunOptions) -> dict[str, Any]:
    """Train (or resume) a run into ``--out``, save the adapter, evaluate; returns the summary (with ``metrics``)."""
    from accelerate import PartialState

    training = options.training
    run = RunFolder(training.output_dir)
    _configure(training)
    state = PartialState()
    check_launch(state.num_processes)
    record = options_record(options)
    made_here = state.is_main_process and path_kind(run.path) is None
    plan = _prepare_folder(run, options, record, state)
    finished = False
    try:
        t0 = time.perf_counter()
        data = build_data(options.data, training.seed)
        if not data.train and not training.no_training:
            raise ArgumentsError("no training examples: raise --train-per-task")
        if options.eval.eval and not data.eval and not data.unseen:
            raise ArgumentsError("nothing to evaluate: --eval-per-task is 0 and there are no unseen tasks (--no-eval)")
        model, tokenizer, info = _build_model(options, data, training)
        decoder_only = not is_encoder_decoder(model.get_base_model())
        fmt = prompt_format(options.data, decoder_only, options.eval.max_new_tokens)
        model.base_model.adapter_metadata = run_metadata(options.data, data, info, training.seed, fmt)
        if options.data.chat_template and not decoder_only:
            raise ArgumentsError("--chat-template is for decoder-only models; this model is encoder-decoder")
        with training.main_process_first(desc="tokenise"):
            features = train_features(options.data, data, tokenizer, decoder_only) if data.train else None
        resolved = _resolved(options, model, data, info, features, state)
        if state.is_main_process:
            run.write_config(record, resolved)
        with _trackers_in(run):
            trainer = _trainer(options, model, tokenizer, features, run, record, resolved)
            final = _final_evaluation(trainer, model, tokenizer, data, options, run)
            summary = _fit(trainer, plan, options, resolved, time.perf_counter() - t0)
            _finish(run, model, summary, record, resolved, state)
            if final is not None:
                from orchmoe.recipe.evaluate import write_trained

                metrics, records = final.result if final.result is not None else final.evaluate()
                summary["metrics"] = write_trained(run, metrics, records) if state.is_main_process else {}
        finished = True
        return summary
    finally:
        run.release()
        if made_here and not finished:
            run.remove_if_unused()


def _final_evaluation(trainer, model, tokenizer, data, options: RunOptions, run: RunFolder):
    """The evaluation by generation, run as the training ends (first among the callbacks, trackers still open)."""
    if not options.eval.eval:
        return None
    from orchmoe.recipe.callbacks import FinalEvaluationCallback
    from orchmoe.recipe.evaluate import evaluate_trained

    final = FinalEvaluationCallback(lambda: evaluate_trained(model, tokenizer, data, options, run, trainer))
    trainer.callback_handler.callbacks.insert(0, final)
    return final


def _resolved(options: RunOptions, model, data, info: dict, features, state) -> dict[str, Any]:
    """What the options resolved to, recorded under ``_resolved`` in config.yaml."""
    trainable, total = model.num_parameters_split()
    training = options.training
    return {
        "orchmoe_version": __version__,
        "adapter": model.peft_config["default"].method_fields(),
        "base_model": info["name"],
        "base_model_source": info["source"],
        "base_dtype": str(model.get_base_model().dtype).removeprefix("torch."),
        "data_dir": str(data.data_dir),
        "seen_tasks": data.seen_tasks,
        "unseen_tasks": data.unseen_tasks,
        "num_processes": state.num_processes,
        "mixed_precision": "bf16" if training.bf16 else "fp16" if training.fp16 else "no",
        "effective_batch_size": training.per_device_train_batch_size
        * state.num_processes
        * training.gradient_accumulation_steps,
        "train_examples": len(features) if features is not None else 0,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def _fit(trainer, plan, options: RunOptions, resolved: dict, setup_seconds: float) -> dict[str, Any]:
    """Train (unless --max-steps 0) and summarise: steps, epochs, time, final loss."""
    training = options.training
    t0 = time.perf_counter()
    if not training.no_training:
        if trainer.is_world_process_zero():
            print(
                f"training {options.model.method} on {len(resolved['seen_tasks'])} tasks, "
                f"{resolved['train_examples']} examples (effective batch {resolved['effective_batch_size']}, "
                f"{resolved['num_processes']} process(es), setup {setup_seconds:.0f} s)"
                + (f"; resuming from {plan.resume_from}" if plan.resume_from else "")
            )
        try:
            trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise _disk_full_in_checkpoint(trainer, e) from e
    state = trainer.state  # train() replaces it
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    return {
        "method": options.model.method,
        "base_model": resolved["base_model"],
        "trainable_parameters": resolved["trainable_parameters"],
        "total_parameters": resolved["total_parameters"],
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "train_seconds": round(time.perf_counter() - t0, 3),
        "final_loss": losses[-1] if losses else None,
        "num_processes": resolved["num_processes"],
        "effective_batch_size": resolved["effective_batch_size"],
        "seen_tasks": len(resolved["seen_tasks"]),
        "train_examples": resolved["train_examples"],
    }


def _disk_full_in_checkpoint(trainer, error: OSError) -> DiskFullError:
    """A full disk while the Trainer wrote a checkpoint: the checkpoint it was writing removed (it never got its
    manifest), and one line naming it; the same command then resumes from the previous complete checkpoint."""
    run = RunFolder(trainer.args.output_dir)
    partial = [c for c in run.checkpoints() if not (c / RunFolder.MANIFEST).exists()]
    if trainer.is_world_process_zero():
        for ckpt in partial:
            shutil.rmtree(ckpt, ignore_errors=True)
    where = f"{partial[-1]}/ (a checkpoint; removed)" if partial else str(run.path)
    return DiskFullError(errno.ENOSPC, f"no space left on the device while writing {where}: {error.strerror or error}")


def _finish(run: RunFolder, model, summary: dict, record: dict, resolved: dict, state) -> None:
    """The final adapter (one unit, never a NaN one), config.yaml and the summary, written by the main process."""
    from orchmoe.adapters.folder import save_adapter
    from orchmoe.training.callbacks import NonFiniteLossError, non_finite_parameters

    bad = non_finite_parameters(model)
    if bad:
        raise NonFiniteLossError(f"the trained adapter holds NaN/inf ({bad[0]}): it was not saved; lower --lr")
    if state.is_main_process:
        with reporting_disk_full(run.adapter_dir):
            save_adapter(model, run.adapter_dir)
        run.write_config(record, {**resolved, "total_steps": summary["steps"]})
        run.write_json(RunFolder.SUMMARY, summary)
        print(
            f"saved adapter to {run.adapter_dir} ({summary['steps']} steps, "
            f"{summary['train_seconds']:.0f} s of training)"
        )
    state.wait_for_everyone()
