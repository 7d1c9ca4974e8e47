"""The run folder: the one place that knows its file names, reads them and writes them.

Layout (``--out``)::

    config.yaml            the resolved configuration (re-usable with --config)
    train_log.jsonl        one JSON record per `log_every` optimizer steps
    checkpoints/step-N/    adapter/, optimizer.pt, scheduler.pt, rng_state_<rank>.pth, trainer_state.json
    adapter/               the final adapter (safetensors + adapter_config.json with task metadata)
    train_summary.json     steps, examples, tokens, wall time, parameter counts
    predictions.jsonl, metrics.json, metrics.md   (written by the evaluation)
    analysis/              written by `orchmoe analyze`

Every write is atomic (`orchmoe.fileio`); a checkpoint is written into a temporary folder and
renamed into place once complete, so a killed run always finds the last complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..fileio import atomic_write_text, fsync_tree
from .options import RESUME_FREE, TrainConfig, TrainConfigError, config_from_mapping

__all__ = ["RunFolder", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunFolder:
    """A training run's folder: names, readers and writers of everything in it."""

    CONFIG = "config.yaml"
    LOG = "train_log.jsonl"
    SUMMARY = "train_summary.json"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    PREDICTIONS = "predictions.jsonl"
    METRICS = "metrics.json"
    METRICS_MD = "metrics.md"
    ANALYSIS = "analysis"
    STATE = "trainer_state.json"  # written last into a checkpoint: marks it complete
    OUTPUTS = (ADAPTER, CHECKPOINTS, LOG, SUMMARY, PREDICTIONS, METRICS, METRICS_MD, CONFIG)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    # -- configuration --------------------------------------------------------------------------
    def write_config(self, cfg: TrainConfig, resolved: dict | None = None, path: Path | None = None) -> None:
        d = cfg.to_dict()
        d["overwrite"] = False  # an action of that invocation, not a setting to replay from the file
        if resolved:
            d["_resolved"] = resolved
        atomic_write_text(path or self.path / self.CONFIG, yaml.safe_dump(d, sort_keys=False, allow_unicode=True))

    def read_config(self, folder: Path | None = None) -> tuple[TrainConfig, dict]:
        """(TrainConfig, resolved info) of this folder's (or a checkpoint's) config.yaml."""
        p = (folder or self.path) / self.CONFIG
        if not p.is_file():
            raise FileNotFoundError(f"{p.parent} has no {self.CONFIG}: not an orchmoe run folder")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise TrainConfigError(f"{p} is not a readable YAML file: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise TrainConfigError(f"{p} does not hold a run configuration (a mapping of options)")
        resolved = raw.get("_resolved", {})
        return TrainConfig(**config_from_mapping(raw, origin=str(p))), resolved if isinstance(resolved, dict) else {}

    # -- results ----------------------------------------------------------------------------------
    def _read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrainConfigError(f"{p} is not valid JSON (truncated?): {e}") from None

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2))

    def read_summary(self) -> dict:
        return self._read_json(self.SUMMARY) if (self.path / self.SUMMARY).is_file() else {}

    def read_metrics(self) -> dict:
        if not (self.path / self.METRICS).is_file():
            raise FileNotFoundError(f"{self.path} has no {self.METRICS}: evaluate it first with `orchmoe eval {self.path}`")
        return self._read_json(self.METRICS)

    def write_results(self, metrics: dict, markdown: str, predictions: list[dict]) -> None:
        """metrics.json, metrics.md and predictions.jsonl of an evaluation."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / self.PREDICTIONS, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        self.write_json(self.METRICS, metrics)
        atomic_write_text(self.path / self.METRICS_MD, markdown)

    # -- the training log -------------------------------------------------------------------------
    def open_log(self):
        return open(self.path / self.LOG, "a", encoding="utf-8")

    def read_log(self) -> list[dict]:
        p = self.path / self.LOG
        if not p.is_file():
            return []
        records = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return records

    def truncate_log(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log reads as one run."""
        if (self.path / self.LOG).is_file():
            keep = [r for r in self.read_log() if r.get("step", 0) <= step]
            atomic_write_text(self.path / self.LOG, "".join(json.dumps(r) + "\n" for r in keep))

    # -- deciding between a fresh start and a resume -------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
        root = self.path / self.CHECKPOINTS
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir()
                 if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / self.STATE).is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def prepare(self, cfg: TrainConfig) -> tuple[Path | None, list[Path]]:
        """(checkpoint to resume from, leftovers of a previous run to delete); refuses to clobber a run silently.

        Every process decides the same way; only the main process deletes, after all have decided.
        """
        out = self.path
        if (out / self.SUMMARY).is_file() and not cfg.overwrite:
            raise TrainConfigError(f"{out} holds a finished run; pass --overwrite to train it again, use another --out, "
                                   f"or `orchmoe eval {out}` to re-score it")
        ckpt = self.latest_checkpoint() if cfg.resume and not cfg.overwrite else None
        if ckpt is not None:
            saved, _ = self.read_config(ckpt)
            diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in saved.to_dict()
                    if k not in RESUME_FREE and getattr(saved, k) != getattr(cfg, k)}
            if diff:
                shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise TrainConfigError(f"{out} holds a checkpoint of a different configuration ({shown}); "
                                       "pass the same options to resume, or --overwrite / another --out to start afresh")
            return ckpt, []
        found = [out / n for n in self.OUTPUTS if (out / n).exists()]
        if found and {p.name for p in found} <= {self.CONFIG, self.LOG}:
            return None, found  # a run interrupted before its first checkpoint: nothing to keep, start again
        if found and not cfg.overwrite:
            raise TrainConfigError(f"{out} already holds a run ({', '.join(p.name for p in found)}); pass --overwrite to "
                                   f"replace it, use another --out, or `orchmoe eval {out}` to re-score it")
        return None, found

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, step: int, accelerator, routed, optimizer, scheduler, state: dict, cfg: TrainConfig,
                        resolved: dict, metadata: dict, keep: int) -> Path:
        """Every process writes its RNG state into a temporary folder; the main process adds the adapter,
        optimizer, scheduler and trainer state (last), flushes it and renames it into place."""
        root = self.path / self.CHECKPOINTS
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            routed.save_adapter(tmp / self.ADAPTER, metadata=metadata)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            self.write_config(cfg, resolved, path=tmp / self.CONFIG)
            (tmp / self.STATE).write_text(json.dumps(state, indent=2))  # last: marks it complete
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, ckpt: Path, accelerator, routed, optimizer, scheduler) -> dict:
        """Restore a checkpoint into the model, optimizer, scheduler and RNGs; returns its trainer state."""
        saved = json.loads((ckpt / self.STATE).read_text())
        world = accelerator.num_processes
        if saved.get("num_processes", 1) != world:
            raise TrainConfigError(f"{ckpt} was written by {saved.get('num_processes')} processes; resume it with the "
                                   f"same number (now {world}): the batch order depends on it")
        routed.load_adapter_weights(ckpt / self.ADAPTER)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        set_rng_state(torch.load(ckpt / f"rng_state_{accelerator.process_index}.pth", weights_only=True))
        return saved


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain tensors and numbers (no pickled objects)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
