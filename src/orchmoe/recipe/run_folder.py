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

Every write is atomic (`orchmoe.utils.fileio`); a checkpoint is written into a temporary folder and renamed
into place once complete. Resuming takes the newest checkpoint whose manifest, step and configuration
check out (a corrupted one is set aside as ``corrupt-step-N``); a run killed before its first
checkpoint starts again. Files are only deleted in a folder carrying the marker (or written by an
orchmoe without markers), and only the names above.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchmoe.adapters.folder import ADAPTER_CONFIG
from orchmoe.recipe.checkpoints import STEP_DIR, CheckpointError, CheckpointMixin, rng_state, set_rng_state  # noqa: F401
from orchmoe.recipe.options import RESUME_FREE, TrainConfig, TrainConfigError, config_from_mapping, yaml_error_line
from orchmoe.utils.fileio import FolderLock, atomic_write_text, reporting_disk_full
from orchmoe.version import __version__

__all__ = ["RunFolder", "ResumePlan", "CheckpointError", "rng_state", "set_rng_state"]


@dataclass
class ResumePlan:
    """What `RunFolder.plan` decided: the checkpoint to resume from (None: start at step 0), files of an
    earlier or interrupted run to delete, corrupted checkpoints to set aside, and what to tell the user."""

    resume_from: Path | None = None
    delete: list[Path] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RunFolder(CheckpointMixin):
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
