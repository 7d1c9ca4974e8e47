"""The run folder: the one place that knows its file names, reads them and writes them.

Layout (``--out``)::

    .orchmoe-run           marker: orchmoe made this folder a run folder (only then does it delete in it)
    .orchmoe-run.lock      held (flock) by the training process for the life of a run: pid, host, start
    config.yaml            the resolved configuration (re-usable with --config)
    train_log.jsonl        one JSON record per `log_every` optimizer steps
    checkpoints/step-N/    adapter/, optimizer.pt, scheduler.pt, rng_state_<rank>.pth, config.yaml,
                           trainer_state.json, manifest.json (sizes and sha256 of the rest, written last)
    adapter/               the final adapter (safetensors + adapter_config.json with task metadata)
    train_summary.json     steps, examples, tokens, wall time, parameter counts (written last: the run is done)
    predictions.jsonl, metrics.json, metrics.md   (written by the evaluation)
    analysis/              written by `orchmoe analyze`

Every write is atomic (`orchmoe.fileio`); a checkpoint is written into a temporary folder and renamed
into place once complete. Resuming takes the newest checkpoint whose manifest, step and configuration
check out (a corrupted one is set aside as ``corrupt-step-N``); a run killed before its first
checkpoint starts again. Files are only deleted in a folder carrying the marker (or written by an
orchmoe without markers), and only the names above.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..fileio import (
    FolderLock,
    atomic_torch_save,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    reporting_disk_full,
    verify_manifest,
    write_manifest,
)
from ..serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_tensors
from ..sharding import full_optimizer_state, is_sharded, load_full_optimizer_state, unsharded
from .options import RESUME_FREE, TrainConfig, TrainConfigError, config_from_mapping, yaml_error_line

__all__ = ["RunFolder", "ResumePlan", "CheckpointError", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(TrainConfigError):
    """A checkpoint that cannot be used (incomplete, corrupted, or not orchmoe's)."""


@dataclass
class ResumePlan:
    """What `RunFolder.plan` decided: the checkpoint to resume from (None: start at step 0), files of an
    earlier or interrupted run to delete, corrupted checkpoints to set aside, and what to tell the user."""

    resume_from: Path | None = None
    delete: list[Path] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RunFolder:
    """A training run's folder: names, readers and writers of everything in it."""

    MARKER = ".orchmoe-run"
    LOCK = ".orchmoe-run.lock"
    CONFIG = "config.yaml"
    LOG = "train_log.jsonl"
    SUMMARY = "train_summary.json"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    PREDICTIONS = "predictions.jsonl"
    METRICS = "metrics.json"
    METRICS_MD = "metrics.md"
    ANALYSIS = "analysis"
    STATE = "trainer_state.json"
    MANIFEST = "manifest.json"  # written last into a checkpoint: marks it complete and checks it
    # Everything orchmoe writes into a run folder: the only names it ever deletes there.
    OUTPUTS = (ADAPTER, CHECKPOINTS, LOG, SUMMARY, PREDICTIONS, METRICS, METRICS_MD, CONFIG, ANALYSIS)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = FolderLock(self.path / self.LOCK)

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
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{p} is not a readable YAML file: {yaml_error_line(e)}") from None
        except UnicodeDecodeError as e:
            raise TrainConfigError(
                f"{p} is not a readable YAML file: not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
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
            raise FileNotFoundError(
                f"{self.path} has no {self.METRICS}: evaluate it first with `orchmoe eval {self.path}`"
            )
        return self._read_json(self.METRICS)

    def write_results(self, metrics: dict, markdown: str, predictions: list[dict]) -> None:
        """metrics.json, metrics.md and predictions.jsonl of an evaluation."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.path / self.PREDICTIONS, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        )
        self.write_json(self.METRICS, metrics)
        atomic_write_text(self.path / self.METRICS_MD, markdown)

    # -- the training log -------------------------------------------------------------------------
    def open_log(self) -> _Log:
        return _Log(self.path / self.LOG)

    def read_log(self) -> list[dict]:
        p = self.path / self.LOG
        if not p.is_file():
            return []
        records = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return records

    def truncate_log(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log reads as one run."""
        if (self.path / self.LOG).is_file():
            keep = [
                r
                for r in self.read_log()
                if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step
            ]
            atomic_write_text(self.path / self.LOG, "".join(json.dumps(r) + "\n" for r in keep))

    # -- ownership: the marker and the lock -------------------------------------------------------
    def is_run_folder(self) -> bool:
        """Whether orchmoe made this folder: its marker, or (written before markers existed) an orchmoe
        adapter or a complete checkpoint in it."""
        if (self.path / self.MARKER).is_file():
            return True
        try:
            meta = json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            if isinstance(meta, dict) and meta.get("format") == "orchmoe-adapter":
                return True
        except (OSError, ValueError):
            pass
        return bool(self.checkpoints())

    def check_out(self) -> None:
        """Refuse an --out that is a file, or a folder orchmoe did not make holding names orchmoe writes
        (a hand-written config.yaml, the current directory's files): it never writes over those."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise TrainConfigError(
                f"--out {str(p)!r} is a file, not a folder; a run folder is a directory: choose another --out"
            )
        if p.is_dir() and not self.is_run_folder():
            clash = sorted(n for n in self.OUTPUTS if (p / n).exists())
            if clash:
                raise TrainConfigError(
                    f"{str(p)!r} is not an orchmoe run folder (no {self.MARKER} marker) but holds {', '.join(clash)}; "
                    "orchmoe never writes over or deletes files it did not write: choose a new or empty --out"
                )

    def claim(self) -> None:
        """Make the folder (if needed) and take its lock for the life of the run (main process only).

        Raises `FolderLockedError` naming the holder when another run holds it."""
        self.check_out()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(f"run folder {str(self.path)!r}")
        self.check_out()  # again, now that no other run can be changing it

    def release(self) -> None:
        """Give the lock back (the kernel also drops it when the process dies)."""
        self._lock.release()

    @property
    def locked(self) -> bool:
        return self._lock.held

    # -- deciding between a fresh start and a resume -------------------------------------------
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
            and (m := _STEP_DIR.match(p.name))
            and ((p / self.MANIFEST).is_file() or (p / self.STATE).is_file())
        ]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def verify_checkpoint(self, ckpt: Path) -> str | None:
        """None when ``ckpt`` can be resumed from, else what is wrong with it: its manifest (sizes, sha256), its
        trainer state (step = folder name), its configuration, and that every tensor file reads as plain data."""
        step = int(_STEP_DIR.match(ckpt.name).group(1))
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

    def plan(self, cfg: TrainConfig) -> ResumePlan:
        """Fresh start or resume, and what to clean up; refuses to clobber a run silently.

        Every process decides the same way (nothing is changed here); the main process applies the plan."""
        out, plan = self.path, ResumePlan()
        owned = [out / n for n in self.OUTPUTS if (out / n).exists()]
        if cfg.overwrite:
            plan.delete = owned
            return plan
        if (out / self.SUMMARY).is_file():
            raise TrainConfigError(
                f"{out} holds a finished run; pass --overwrite to train it again, use another --out, "
                f"or `orchmoe eval {out}` to re-score it"
            )
        found = self.checkpoints()
        if found and not cfg.resume:
            raise TrainConfigError(
                f"{out} holds checkpoints of an unfinished run and --no-resume was given; pass "
                "--overwrite to start afresh, or drop --no-resume to continue it"
            )
        # temporary folders of checkpoint saves that were cut short: never complete, always ours to remove
        plan.delete = sorted((out / self.CHECKPOINTS).glob(".tmp-step-*"))
        bad: list[str] = []
        for ckpt in reversed(found):
            problem = self.verify_checkpoint(ckpt)
            if problem is None:
                plan.resume_from = ckpt
                break
            bad.append(f"{ckpt.name}: {problem}")
            plan.set_aside.append(ckpt)
        if found and plan.resume_from is None:
            raise CheckpointError(
                f"{out} holds checkpoints but none can be resumed from ({'; '.join(bad)}); pass "
                "--overwrite to start afresh, or use another --out"
            )
        if plan.resume_from is None:
            # an unfinished run with no checkpoint (killed before its first one, or in its final save): start again
            plan.delete = owned
            if owned:
                plan.notes.append(
                    f"{out} holds an unfinished run without a usable checkpoint "
                    f"({', '.join(p.name for p in owned)}); starting it again from step 0"
                )
            return plan
        saved, _ = self.read_config(plan.resume_from)
        diff = {
            k: (getattr(saved, k), getattr(cfg, k))
            for k in saved.to_dict()
            if k not in RESUME_FREE and getattr(saved, k) != getattr(cfg, k)
        }
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TrainConfigError(
                f"{out} holds a checkpoint of a different configuration ({shown}); "
                "pass the same options to resume, or --overwrite / another --out to start afresh"
            )
        plan.notes += [f"checkpoint {b} is not usable; set aside as corrupt-{b.split(':')[0]}" for b in bad]
        return plan

    def apply(self, plan: ResumePlan) -> None:
        """Carry out a plan (main process): mark the folder as a run folder, warn, set corrupted checkpoints
        aside, delete leftovers."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / self.MARKER).is_file():
            atomic_write_text(
                self.path / self.MARKER,
                json.dumps(
                    {
                        "format": "orchmoe-run",
                        "orchmoe_version": __version__,
                        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    }
                ),
            )
        for note in plan.notes:
            warnings.warn(note, stacklevel=3)
        for ckpt in plan.set_aside:
            aside = ckpt.with_name(f"corrupt-{ckpt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
        for p in plan.delete:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # -- checkpoints ----------------------------------------------------------------------------
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


class _Log:
    """The training log, opened for appending; a full disk while writing it is reported naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with reporting_disk_full(path):
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        with reporting_disk_full(self.path):
            self._fh.write(text)

    def flush(self) -> None:
        with reporting_disk_full(self.path):
            self._fh.flush()

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:  # the error was reported by the write or flush that met it
            pass


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
