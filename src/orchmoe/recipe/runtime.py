"""The `Accelerator` of a run (training or evaluation): precision, trackers, DDP settings."""
from __future__ import annotations

import torch

from .options import TrainConfig, TrainConfigError

__all__ = ["make_accelerator", "mixed_precision"]


def mixed_precision(mode: str) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16), no mixed precision on CPU."""
    if mode == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if mode == "fp16" and not torch.cuda.is_available():
        raise TrainConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    return mode


def make_accelerator(cfg: TrainConfig, **kwargs):
    """Gradient accumulation, mixed precision, trackers, and DDP without buffer broadcasts (the Task
    Router's statistics are kept equal on every process by their own all-gather)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    trackers = None if cfg.report_to == "none" else cfg.report_to
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed_precision(cfg.mixed_precision),
                       log_with=trackers, project_dir=cfg.out,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)], **kwargs)
