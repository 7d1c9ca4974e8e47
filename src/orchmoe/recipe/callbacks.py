"""The recipe's parts of the Trainer: its logs in ``train_log.jsonl``, and checkpoints verified and replayable.

`RunLogCallback` appends every training log (the Trainer's record, the routing fields included) to the run
folder's ``train_log.jsonl``. `CheckpointCallback` runs after the Trainer wrote ``checkpoint-N``: it adds the
options the run was started with (``config.yaml``: a resume with other weight-affecting options is refused)
and, last, ``manifest.json`` with the size and sha256 of every file, which marks the checkpoint complete
(`orchmoe.recipe.run_folder.RunFolder.verify_checkpoint`). A kill while the Trainer writes leaves a checkpoint
without a manifest, which a resume passes over for the previous one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from orchmoe.recipe.run_folder import RunFolder
from orchmoe.utils.fileio import fsync_tree, write_manifest

__all__ = ["CheckpointCallback", "FinalEvaluationCallback", "RunLogCallback"]


class RunLogCallback(TrainerCallback):
    """Every training log as one ``train_log.jsonl`` record (main process): ``step``, ``epoch`` and the log."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if k not in record})
        self.run.append_log(record)


class CheckpointCallback(TrainerCallback):
    """``config.yaml`` and, last, ``manifest.json`` into each checkpoint the Trainer writes (main process)."""

    def __init__(self, run: RunFolder, options: dict[str, Any], resolved: dict[str, Any]) -> None:
        self.run, self.options, self.resolved = run, options, resolved

    def on_save(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        self.run.write_config(self.options, self.resolved, folder=ckpt)
        fsync_tree(ckpt)
        write_manifest(ckpt, RunFolder.MANIFEST)


class FinalEvaluationCallback(TrainerCallback):
    """Runs the end-of-training evaluation as the training ends, before the trackers close (put it first), so its
    scores land in the same tracker run as the losses."""

    def __init__(self, evaluate) -> None:
        self.evaluate, self.result = evaluate, None

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.result is None:
            self.result = self.evaluate()
