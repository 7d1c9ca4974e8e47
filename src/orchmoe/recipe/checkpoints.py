"""Checkpoints of a run: written atomically with a manifest of checksums (last), verified before use, read
without unpickling anything, and gathered whole from a sharded (FSDP) model. `RunFolder` inherits these."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_tensors
from orchmoe.recipe.options import TrainConfig, TrainConfigError
from orchmoe.tuner.sharding import full_optimizer_state, is_sharded, load_full_optimizer_state, unsharded
from orchmoe.utils.fileio import (
    atomic_torch_save,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    reporting_disk_full,
    verify_manifest,
    write_manifest,
)

__all__ = ["CheckpointError", "CheckpointMixin", "rng_state", "set_rng_state", "STEP_DIR"]

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(TrainConfigError):
    """A checkpoint that cannot be used (incomplete, corrupted, or not orchmoe's)."""


class CheckpointMixin:
    """The checkpoints of a `RunFolder` (``self.path``, its file names, `read_config`/`write_config`)."""

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: renamed into place (temporary folders of an interrupted save are
        ignored) with their manifest, or their trainer state for those written before manifests."""
        root = self.path / self.CHECKPOINTS
        if not root.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in root.iterdir()
            if p.is_dir()
            and (m := STEP_DIR.match(p.name))
            and ((p / self.MANIFEST).is_file() or (p / self.STATE).is_file())
        ]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def verify_checkpoint(self, ckpt: Path) -> str | None:
        """None when ``ckpt`` can be resumed from, else what is wrong with it: its manifest (sizes, sha256), its
        trainer state (step = folder name), its configuration, and that every tensor file reads as plain data."""
        step = int(STEP_DIR.match(ckpt.name).group(1))
        if (ckpt / self.MANIFEST).is_file():
            problem = verify_manifest(ckpt, self.MANIFEST)
            if problem:
                return problem
        required = [
            self.STATE,
            self.CONFIG,
            "optimizer.pt",
            "scheduler.pt",
            "rng_state_0.pth",
            f"{self.ADAPTER}/{ADAPTER_WEIGHTS}",
            f"{self.ADAPTER}/{ADAPTER_CONFIG}",
        ]
        missing = [r for r in required if not (ckpt / r).is_file()]
        if missing:
            return f"{', '.join(missing)} missing"
        try:
            state = json.loads((ckpt / self.STATE).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"{self.STATE} is not valid JSON ({e})"
        if not isinstance(state, dict) or type(state.get("global_step")) is not int:
            return f"{self.STATE} has no integer global_step"
        if state["global_step"] != step:
            return f"{self.STATE} says global_step {state['global_step']}, the folder is step {step}"
        try:
            self.read_config(ckpt)
            read_adapter_tensors(ckpt / self.ADAPTER)
            for f in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("rng_state_*.pth")):
                _torch_load(f)
        except (TrainConfigError, ValueError, OSError) as e:
            return str(e)
        return None

    def save_checkpoint(
        self,
        step: int,
        accelerator,
        routed,
        optimizer,
        scheduler,
        state: dict,
        cfg: TrainConfig,
        resolved: dict,
        metadata: dict,
        keep: int,
    ) -> Path:
        """Every process writes its RNG state into a temporary folder; the main process adds the adapter,
        optimizer, scheduler, configuration, trainer state and (last) the manifest, flushes the folder and
        renames it into place. A failure (a full disk) removes the temporary folder and keeps the older ones.

        A sharded (FSDP) model's adapter and optimizer state are gathered whole by every process (collectives)
        and written by the main one: the files are the same as without sharding, the optimizer's keyed by
        parameter name."""
        root = self.path / self.CHECKPOINTS
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        try:
            with reporting_disk_full(tmp):
                if accelerator.is_main_process:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                accelerator.wait_for_everyone()
                atomic_torch_save(tmp / f"rng_state_{accelerator.process_index}.pth", rng_state())
                accelerator.wait_for_everyone()
                optim_state = full_optimizer_state(routed, optimizer) if is_sharded(routed) else None
                with unsharded(routed):
                    if accelerator.is_main_process:
                        self._write_checkpoint(
                            tmp,
                            final,
                            routed,
                            optimizer if optim_state is None else optim_state,
                            scheduler,
                            accelerator.scaler,
                            state,
                            cfg,
                            resolved,
                            metadata,
                            keep,
                        )
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
            raise
        accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(
        self,
        tmp: Path,
        final: Path,
        routed,
        optimizer,
        scheduler,
        scaler,
        state: dict,
        cfg: TrainConfig,
        resolved: dict,
        metadata: dict,
        keep: int,
    ) -> None:
        """The main process's files (``optimizer``: the optimizer, or its state dict already gathered)."""
        routed.save_adapter(tmp / self.ADAPTER, metadata=metadata)
        atomic_torch_save(tmp / "optimizer.pt", optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        atomic_torch_save(tmp / "scheduler.pt", scheduler.state_dict())
        if scaler is not None:
            atomic_torch_save(tmp / "scaler.pt", scaler.state_dict())
        self.write_config(cfg, resolved, path=tmp / self.CONFIG)
        atomic_write_text(tmp / self.STATE, json.dumps(state, indent=2))
        write_manifest(tmp, self.MANIFEST)  # last: marks it complete
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, ckpt: Path, accelerator, routed, optimizer, scheduler) -> dict:
        """Restore a checkpoint into the model, optimizer, scheduler and RNGs; returns its trainer state.

        Tensor files are read with ``weights_only=True``: a pickle planted in a run folder never runs."""
        saved = json.loads((ckpt / self.STATE).read_text())
        world = accelerator.num_processes
        if saved.get("num_processes", 1) != world:
            raise TrainConfigError(
                f"{ckpt} was written by {saved.get('num_processes')} processes; resume it with the "
                f"same number (now {world}): the batch order depends on it"
            )
        routed.load_adapter_weights(ckpt / self.ADAPTER)  # a sharded model's parameters each take their slice
        optim_state = _torch_load(ckpt / "optimizer.pt", map_location="cpu")
        if is_sharded(routed):
            load_full_optimizer_state(routed, optimizer, optim_state)
        else:
            optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(_torch_load(ckpt / "scheduler.pt"))
        if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(_torch_load(ckpt / "scaler.pt"))
        set_rng_state(_torch_load(ckpt / f"rng_state_{accelerator.process_index}.pth"))
        return saved


def _torch_load(path: Path, **kwargs) -> Any:
    """A tensor file as plain data (``weights_only=True``); a clear error naming it when it is unreadable or
    holds anything but tensors and numbers (a planted pickle)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch reports a bad file in many ways
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} holds pickled Python objects (or bytes that read as such), not plain tensors: "
                "refused without running them (orchmoe never writes such a file: corrupted or "
                "tampered with)"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable tensor file (truncated or corrupted?): {first}") from None


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain tensors and numbers (no pickled objects)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
