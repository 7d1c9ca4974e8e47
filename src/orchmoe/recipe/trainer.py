"""The training recipe: multi-task fine-tuning of a routed adapter on `accelerate`, as a class of short steps.

`Trainer(cfg).run()` prepares the run folder (fresh, or resumed from its latest checkpoint), loads
the data and the base model, builds the adapter and the two-speed optimiser groups, trains, saves
the adapter and evaluates. Infrastructure lives in the library (`orchmoe.tuner.model`, `orchmoe.data`,
`orchmoe.core.diagnostics`) and in the recipe's own modules (options, run folder, batches, evaluation).

Per step nothing waits for the device: losses, the gradient norm and the routing statistics stay
on it and are read once per logging window; token counts come from the host-side features.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from orchmoe.core.diagnostics import routing_record
from orchmoe.loading.pretrained import is_encoder_decoder, load_model_and_tokenizer
from orchmoe.recipe.adapter_options import build_adapter_config
from orchmoe.recipe.batches import (
    answer_window,
    device_batch,
    epoch_batches,
    first_answer_position,
    label_tokens,
    rank_slice,
    tokens_of,
)
from orchmoe.recipe.data import build_data, run_metadata, train_features
from orchmoe.recipe.evaluate import evaluate_model
from orchmoe.recipe.options import SCHEDULES, TrainConfig, TrainConfigError
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.recipe.runtime import LAUNCH_HELP, end_tracking, make_accelerator, tracker_config
from orchmoe.tuner.model import get_model
from orchmoe.tuner.sharding import (
    full_tensor,
    is_sharded,
    local_parameter_count,
    set_gradient_sync,
    shard_model,
    unsharded,
)
from orchmoe.version import __version__

__all__ = ["Trainer", "train"]


def _window() -> dict[str, Any]:
    return {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0, "grad_norm": 0.0}


class Trainer:
    """One training run of ``cfg``: `run()` = setup, train, finish, evaluate."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        build_adapter_config(cfg, None, 1)  # option errors surface before any data or model is loaded
        if cfg.generation_tokens < cfg.max_target_len:
            warnings.warn(
                f"max_new_tokens={cfg.generation_tokens} is below max_target_len={cfg.max_target_len}: answers "
                "the model was trained to give in full are cut at evaluation",
                stacklevel=2,
            )
        self.cfg = cfg
        self.folder = RunFolder(cfg.out)

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            self.train()
            summary = self.finish()
            if self.cfg.eval:
                summary["metrics"] = self.evaluate()
            if self.cfg.report_to != "none":
                end_tracking(self.acc, summary, self.state["global_step"])
        finally:
            self.folder.release()  # the run folder's lock, held since prepare_folder
        return summary

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        self.acc = make_accelerator(self.cfg)
        self.is_main, self.rank, self.world = self.acc.is_main_process, self.acc.process_index, self.acc.num_processes
        if self.cfg.fsdp and self.world == 1:
            raise TrainConfigError(
                "--fsdp shards the model across processes, but this run has one: " + LAUNCH_HELP + " (or drop --fsdp)"
            )
        self.prepare_folder()
        t0 = time.perf_counter()
        self.load_data_and_model()
        self.build_adapter()
        self.build_batches()
        self.build_optimizer()
        self.describe()
        self.restore()
        self.setup_seconds = time.perf_counter() - t0

    def prepare_folder(self) -> None:
        """Claim the run folder (main process: lock, marker), then decide between a fresh start and a resume
        from the newest intact checkpoint (every process alike), then clean up (main process)."""
        self.folder.check_out()  # a bad --out fails alike on every process
        if self.is_main:
            self.folder.claim()
        self.acc.wait_for_everyone()
        plan = self.folder.plan(self.cfg)
        self.acc.wait_for_everyone()
        if self.is_main:
            self.folder.apply(plan)
        self.acc.wait_for_everyone()
        self.resume_from = plan.resume_from

    def load_data_and_model(self) -> None:
        """Data seeded and identical on every process (each process slices its share of a batch)."""
        cfg = self.cfg
        self.data = build_data(cfg)
        if not self.data.train and (cfg.max_steps or 0) > 0:
            raise TrainConfigError("no training examples: raise train_per_task")
        if cfg.eval and not self.data.eval and not self.data.unseen:
            raise TrainConfigError(
                "nothing to evaluate: eval_per_task is 0 and there are no unseen tasks (pass --no-eval "
                "to train without an evaluation)"
            )
        self.base, self.tokenizer, self.info = load_model_and_tokenizer(
            cfg.model, dtype=cfg.dtype, device=self.acc.device
        )
        self.decoder_only = not is_encoder_decoder(self.base)
        if cfg.chat_template and not self.decoder_only:
            raise TrainConfigError("--chat-template is for decoder-only models; this model is encoder-decoder")

    def build_adapter(self) -> None:
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed)  # adapter initialisation: identical on every process
        self.adapter_cfg = build_adapter_config(self.cfg, self.base, self.data.num_tasks)
        self.routed = get_model(self.base, self.adapter_cfg, base_model_name=self.info["name"])
        self.routed.aux_loss_in_loss = False  # weighted apart from the LM loss (forward_backward)
        if self.cfg.gradient_checkpointing:
            self.routed.gradient_checkpointing_enable()
            self.base.config.use_cache = False
        self.n_trainable, self.n_total = self.routed.num_parameters_split()
        if self.is_main:
            self.routed.print_trainable_parameters()

    def build_batches(self) -> None:
        cfg = self.cfg
        self.feats = train_features(cfg, self.data, self.tokenizer, self.decoder_only, self.acc)
        self.lengths = [len(f["input_ids"]) + (0 if self.decoder_only else len(f["labels"])) for f in self.feats]
        self.task_of = [f["task_id"] for f in self.feats]
        self.n_labels = [label_tokens(f, self.decoder_only) for f in self.feats]
        n_global = math.ceil(len(self.feats) / (cfg.batch_size * self.world)) if self.feats else 0
        self.steps_per_epoch = math.ceil(n_global / cfg.grad_accum) if n_global else 0
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        if self.total_steps > 0 and self.steps_per_epoch == 0:
            raise TrainConfigError("no training examples for the requested steps")

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            self.lengths, self.cfg.batch_size, self.world, self.cfg.seed, epoch, self.task_of, self.cfg.length_window
        )

    def build_optimizer(self) -> None:
        """The model prepared first (DDP-wrapped, or sharded by FSDP2: its parameters become `DTensor` shards),
        then the optimizer over the prepared parameters."""
        from transformers import get_scheduler

        cfg = self.cfg
        self.warmup = (
            cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * self.total_steps)
        )
        if cfg.fsdp:  # our own FSDP2 units (accelerate's FSDP is GPU-only and FSDP1 by default): not DDP-wrapped
            self.model = self.routed = shard_model(self.routed)
        else:
            self.model = self.acc.prepare(self.routed)
            self.routed = self.acc.unwrap_model(self.model)
        optimizer = torch.optim.AdamW(self.routed.parameter_groups(cfg.lr, cfg.router_lr, cfg.weight_decay))
        # Not passed through accelerator.prepare: it would step the schedule once per process.
        self.scheduler = get_scheduler(
            SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=self.warmup, num_training_steps=self.total_steps
        )
        self.optimizer = self.acc.prepare(optimizer)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    def describe(self) -> None:
        """The adapter's metadata (tasks, prompt settings) and the resolved facts of the run for config.yaml."""
        from orchmoe.data import batch_mix

        cfg = self.cfg
        self.metadata = run_metadata(cfg, self.data, self.info)
        mix = batch_mix(self.batches_of_epoch(0), self.task_of, self.lengths)
        self.resolved = {
            "orchmoe_version": __version__,
            "adapter": self.adapter_cfg.to_dict(),
            "base_model": self.info["name"],
            "base_model_source": self.info["source"],
            "base_dtype": str(self.base.dtype).removeprefix("torch."),
            "data_dir": str(self.data.data_dir),
            "seen_tasks": self.data.seen_tasks,
            "unseen_tasks": self.data.unseen_tasks,
            "num_processes": self.world,
            "effective_batch_size": cfg.batch_size * self.world * cfg.grad_accum,
            "train_examples": len(self.feats),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup,
            "mixed_precision": self.acc.mixed_precision,
            "trainable_parameters": self.n_trainable,
            "total_parameters": self.n_total,
            "parameters_per_process": local_parameter_count(self.routed),  # ~total/N under FSDP
            "batch_mix": {k: round(v, 4) for k, v in mix.items()},
        }

    def restore(self) -> None:
        """Resume from the latest checkpoint, or seed the per-process randomness of a fresh run."""
        from accelerate.utils import set_seed

        self.state = {
            "global_step": 0,
            "epoch": 0,
            "step_in_epoch": 0,
            "examples_seen": 0,
            "tokens_seen": 0,
            "train_seconds": 0.0,
            "num_processes": self.world,
        }
        if self.resume_from is not None:
            self.state.update(
                self.folder.load_checkpoint(self.resume_from, self.acc, self.routed, self.optimizer, self.scheduler)
            )
            if self.is_main:
                self.folder.truncate_log(self.state["global_step"])
                print(f"resuming from {self.resume_from} (step {self.state['global_step']}/{self.total_steps})")
        else:
            set_seed(self.cfg.seed, device_specific=True)  # routing noise / dropout: distinct per process
        if self.is_main:
            self.folder.write_config(self.cfg, self.resolved)
        if self.cfg.report_to != "none":
            self.acc.init_trackers("orchmoe", config=tracker_config(self.cfg, self.resolved))
        self.acc.wait_for_everyone()

    # -- training --------------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm.auto import tqdm

        cfg, start = self.cfg, self.state["global_step"]
        if self.is_main and start < self.total_steps:
            print(
                f"training {cfg.method} on {len(self.data.seen_tasks)} tasks, {len(self.feats)} examples, "
                f"{self.total_steps} steps (effective batch {self.resolved['effective_batch_size']}, {self.world} "
                f"process(es), setup {self.setup_seconds:.0f} s)"
            )
        self.bar = tqdm(
            total=self.total_steps,
            initial=start,
            desc=f"train {cfg.method}",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.is_main and cfg.progress) or self.total_steps == 0,
        )
        self.log_file = self.folder.open_log() if self.is_main else None
        self.trim_logits = self.decoder_only and "logits_to_keep" in inspect.signature(self.base.forward).parameters
        # The running sums of the current logging window travel in the checkpoint, so a resumed run
        # writes the same log records as an unbroken one.
        saved = self.state.setdefault("log_window", _window())
        dev = self.acc.device
        self.window = {
            k: (torch.tensor(float(v), dtype=torch.float64, device=dev) if k in ("loss", "aux", "grad_norm") else v)
            for k, v in saved.items()
        }
        self.window_t0, self.last_loss, self.routing_seen = time.perf_counter(), float("nan"), ([], [])
        self.model.train()
        self.epoch, self.order = -1, []
        try:
            for step in range(start, self.total_steps):
                self.train_step(step)
        finally:
            self.bar.close()
            if self.log_file is not None:
                self.log_file.close()

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.order, self.epoch = self.batches_of_epoch(epoch), epoch
        return self.order[k * self.cfg.grad_accum : (k + 1) * self.cfg.grad_accum]

    def forward_backward(
        self, feats: list[dict], lm_weight: float, aux_weight: float, sync: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch, its LM loss (a mean over its answer tokens) weighted by ``lm_weight`` and its auxiliary
        loss by ``aux_weight`` (see `loss_weights`): (weighted LM loss, weighted auxiliary loss), detached."""
        batch, task_ids = device_batch(
            feats,
            self.tokenizer.pad_token_id,
            self.acc.device,
            decoder_only=self.decoder_only,
            with_task_ids=self.adapter_cfg.needs_task_ids,
        )
        if self.trim_logits:
            batch = answer_window(batch, first_answer_position(feats))
        sharded = is_sharded(self.model)
        set_gradient_sync(self.model, sync)  # FSDP2's no_sync
        with nullcontext() if sync or sharded else self.acc.no_sync(self.model):
            with self.acc.autocast() if sharded else nullcontext():  # a prepared (unsharded) model autocasts itself
                outputs = self.model(**batch)
            lm = outputs["loss"] * lm_weight
            aux = outputs.get("aux_loss")
            aux = aux.float() * aux_weight if aux is not None else torch.zeros((), device=lm.device)
            self.acc.backward((lm + aux) * self.cfg.grad_accum)  # backward divides by grad_accum
        pi = self.routed.routing_state.task_probs
        if pi is not None:  # the Task Router's decisions, for this window's diagnostics
            self.routing_seen[0].append(pi.detach())
            self.routing_seen[1].append(task_ids)
        return lm.detach().float(), aux.detach()

    def loss_weights(self, micro: list[list[int]]) -> tuple[list[float], float]:
        """Weights that make a step's gradient that of one process running the whole step: the LM loss a mean over
        every answer token of the step's global batch (whatever the processes and micro-batches), the auxiliary
        loss a mean over micro-batches and processes. Per micro-batch of this process: n_j * W / N, with n_j its
        answer tokens and N those of every process's micro-batches (host-side counts, no communication); DDP and
        FSDP average gradients over the W processes."""
        shares = [[rank_slice(g, r, self.world) for r in range(self.world)] for g in micro]
        total = sum(self.n_labels[i] for share in shares for part in share for i in part)
        mine = [sum(self.n_labels[i] for i in share[self.rank]) for share in shares]
        lm = [n * self.world / total if total else 1.0 / len(micro) for n in mine]
        return lm, 1.0 / len(micro)

    def train_step(self, step: int) -> None:
        cfg, t_step = self.cfg, time.perf_counter()
        micro = self.micro_batches(step)
        step_loss = torch.zeros((), device=self.acc.device)
        step_aux = torch.zeros((), device=self.acc.device)
        tokens = 0
        lm_weights, aux_weight = self.loss_weights(micro)
        for j, gbatch in enumerate(micro):
            feats = [self.feats[i] for i in rank_slice(gbatch, self.rank, self.world)]
            loss, aux = self.forward_backward(feats, lm_weights[j], aux_weight, sync=j == len(micro) - 1)
            step_loss += loss  # this process's share: the mean over processes is the step's loss
            step_aux += aux
            tokens += tokens_of(feats, self.decoder_only)
        grad_norm = self.acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
        if grad_norm is not None:
            grad_norm = full_tensor(grad_norm)  # FSDP: a DTensor (every process runs this line)
        self.optimizer.step()
        if not self.acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state, window = self.state, self.window
        state["global_step"] = step + 1
        state["epoch"], state["step_in_epoch"] = divmod(step + 1, self.steps_per_epoch)
        state["examples_seen"] += sum(len(g) for g in micro)
        state["tokens_seen"] += tokens * self.world
        state["train_seconds"] += time.perf_counter() - t_step
        window["loss"] += step_loss
        window["aux"] += step_aux
        window["n"] += 1
        window["tokens"] += tokens * self.world
        if grad_norm is not None:
            window["grad_norm"] = grad_norm.detach().double()
        if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
            self.log_window(step + 1)
        self.bar.update(1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total_steps:
            self.folder.save_checkpoint(
                step + 1,
                self.acc,
                self.routed,
                self.optimizer,
                self.scheduler,
                self.checkpoint_state(),
                cfg,
                self.resolved,
                self.metadata,
                cfg.keep_checkpoints,
            )

    def checkpoint_state(self) -> dict:
        """The trainer state with the logging window as plain numbers (JSON)."""
        window = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.window.items()}
        return json.loads(json.dumps({**self.state, "log_window": window}))

    def log_window(self, step: int) -> None:
        """One train_log.jsonl record (and tracker entry): the window's losses, rates, speed and routing."""
        cfg, window = self.cfg, self.window
        stats = self.acc.reduce(torch.stack([window["loss"], window["aux"]]), "mean")
        elapsed = time.perf_counter() - self.window_t0
        lrs = self.scheduler.get_last_lr()
        pis, tasks = self.routing_seen
        rec = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": float(stats[0]) / window["n"],
            "aux_loss": float(stats[1]) / window["n"],
            "lr": lrs[0],
            "router_lr": next(
                (lr for g, lr in zip(self.optimizer.param_groups, lrs) if g.get("name") == "allocation"), None
            ),
            "grad_norm": float(window["grad_norm"]) if cfg.max_grad_norm else None,
            "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
            "train_seconds": round(self.state["train_seconds"], 3),
        }
        with unsharded(self.routed, recurse=False):  # FSDP: the model router whole (every process runs this)
            rec.update(
                routing_record(self.routed, torch.cat(pis) if pis else None, torch.cat(tasks) if tasks else None)
            )
        pis.clear(), tasks.clear()
        self.last_loss = rec["loss"]
        if self.log_file is not None:
            self.log_file.write(json.dumps(rec) + "\n")
            self.log_file.flush()
        if cfg.report_to != "none":
            self.acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        shown = {
            "loss": f"{rec['loss']:.4f}",
            "aux": f"{rec['aux_loss']:.3g}",
            "lr": f"{rec['lr']:.2e}",
            "tok_s": f"{rec['tokens_per_s']:.0f}",
        }
        for key, label, fmt in (("allocation_spread", "spread", ".3f"), ("nmi_pi_task", "nmi", ".2f")):
            if key in rec:
                shown[label] = format(rec[key], fmt)
        self.bar.set_postfix(**shown)
        dev = self.acc.device
        self.window = {
            **_window(),
            **{k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("loss", "aux", "grad_norm")},
        }
        self.state["log_window"] = _window()
        self.window_t0 = time.perf_counter()

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Save the adapter, the final config and the summary (main process)."""
        cfg, state = self.cfg, self.state
        if cfg.gradient_checkpointing:
            self.base.config.use_cache = True
        summary = {
            "method": cfg.method,
            "base_model": self.info["name"],
            "trainable_parameters": self.n_trainable,
            "total_parameters": self.n_total,
            "steps": state["global_step"],
            "epochs": round(state["global_step"] / self.steps_per_epoch, 4) if self.steps_per_epoch else 0.0,
            "examples_seen": state["examples_seen"],
            "tokens_seen": state["tokens_seen"],
            "train_seconds": round(state["train_seconds"], 3),
            "final_loss": self.last_loss,
            "num_processes": self.world,
            "effective_batch_size": self.resolved["effective_batch_size"],
            "seen_tasks": len(self.data.seen_tasks),
            "train_examples": len(self.feats),
        }
        with unsharded(self.routed):  # FSDP: the adapter whole, gathered by every process, written by the main one
            if self.is_main:
                self.routed.save_adapter(self.folder.adapter_dir, metadata=self.metadata)
        if self.is_main:
            self.folder.write_config(cfg, self.resolved)
            self.folder.write_json(RunFolder.SUMMARY, summary)
            print(
                f"saved adapter to {self.folder.adapter_dir} ({state['global_step']} steps, "
                f"{summary['train_seconds']:.0f} s of training)"
            )
        self.acc.wait_for_everyone()
        return summary

    def evaluate(self) -> dict:
        return evaluate_model(
            self.routed,
            self.tokenizer,
            self.data,
            self.cfg,
            self.folder.path,
            accelerator=self.acc,
            decoder_only=self.decoder_only,
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run into ``cfg.out``, save the adapter and evaluate; returns a summary dict."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    try:
        return Trainer(cfg).run()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
