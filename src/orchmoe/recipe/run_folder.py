"""The run folder: the one place that knows its file names, reads them and writes them.

Layout (``--out``, the Trainer's ``output_dir``)::

    .orchmoe-run           marker: orchmoe made this folder a run folder (only then does it delete in it)
    .orchmoe-run.lock      held (flock) by the process writing into it: pid, host, start
    config.yaml            the resolved options (re-usable with --config) and what the run resolved
    train_log.jsonl        the Trainer's logs, one record per log (the Trainer's names: loss, learning_rate, ...)
    checkpoint-N/          the Trainer's checkpoints (adapter, optimizer, scheduler, RNG, trainer_state.json),
                           each with manifest.json (sizes and sha256 of every file, written last) and config.yaml
    logs/                  tracker files (TensorBoard)
    adapter/               the final adapter (PEFT's folder; the prompt format and tasks in its record)
    train_summary.json     steps, examples, tokens, wall time, parameter counts (written last: the run is done)
    predictions.jsonl, metrics.json, metrics.md   the evaluation of the run's own tasks
    eval-<name>/           `orchmoe eval RUN --data ...` on other data (never over the run's own metrics)
    analysis/              written by `orchmoe analyze`

Every write is atomic (`orchmoe.utils.fileio`). Resuming takes the newest checkpoint whose manifest, step,
configuration and adapter check out (a damaged one is set aside as ``corrupt-checkpoint-N``); a run killed
before its first checkpoint starts again. Only a folder with the marker is a run folder, and ``--overwrite``
deletes only what orchmoe wrote there: its own file names, and inside its sub-folders the files their
manifests list (a user's file put into one stays, and so does its folder).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchmoe.recipe.args import ArgumentsError
from orchmoe.utils.fileio import (
    FileFormatError,
    atomic_write_text,
    manifest_files,
    path_kind,
    read_json,
    reporting_disk_full,
    verify_manifest,
)
from orchmoe.utils.folder_lock import FolderLock
from orchmoe.version import __version__

__all__ = ["CheckpointError", "ResumePlan", "RunFolder"]

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
#: the files orchmoe's analysis and evaluation write into their own sub-folders (the only ones deleted there)
_SUBFOLDER_FILES = {
    "analysis": (
        "analysis.md",
        "analysis.json",
        "allocation_heatmaps.png",
        "task_skill_heatmap.png",
        "task_abstract_heatmap.png",
        "dendrogram.png",
        "allocations.npz",
    ),
    "eval": ("predictions.jsonl", "metrics.json", "metrics.md"),
}


class CheckpointError(RuntimeError):
    """A run folder whose checkpoints cannot be resumed from."""


@dataclass
class ResumePlan:
    """What `RunFolder.plan` decided: the checkpoint to resume from (None: step 0), what to delete, the damaged
    checkpoints to set aside, and what to tell the user."""

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
    LOGS = "logs"
    PREDICTIONS = "predictions.jsonl"
    METRICS = "metrics.json"
    METRICS_MD = "metrics.md"
    ANALYSIS = "analysis"
    MANIFEST = "manifest.json"
    STATE = "trainer_state.json"
    #: files orchmoe writes at the top of a run folder
    FILES = (CONFIG, LOG, SUMMARY, PREDICTIONS, METRICS, METRICS_MD)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = FolderLock(self.path / self.LOCK)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    # -- configuration ---------------------------------------------------------------------------
    def write_config(self, options: dict[str, Any], resolved: dict | None = None, folder: Path | None = None) -> None:
        """``config.yaml``: the options (a mapping ``--config`` reads back) and, under ``_resolved``, what they
        resolved to."""
        d = dict(options)
        if resolved:
            d["_resolved"] = resolved
        atomic_write_text((folder or self.path) / self.CONFIG, yaml.safe_dump(d, sort_keys=False, allow_unicode=True))

    def read_config(self, folder: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(options, resolved info) of this folder's (or a checkpoint's) config.yaml."""
        from orchmoe.recipe.parse import load_config_file

        p = (folder or self.path) / self.CONFIG
        if path_kind(p) is None:
            raise FileNotFoundError(f"{p.parent} has no {self.CONFIG}: not an orchmoe run folder")
        options = load_config_file(p)
        if not options:
            raise ArgumentsError(f"{p} does not hold a run configuration (a mapping of options)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raw = {}
        resolved = raw.get("_resolved", {}) if isinstance(raw, dict) else {}
        return options, resolved if isinstance(resolved, dict) else {}

    # -- results -------------------------------------------------------------------------------
    def read_json(self, name: str) -> Any:
        try:
            return read_json(self.path / name, name)
        except FileFormatError as e:
            raise ArgumentsError(str(e)) from None

    def write_json(self, name: str, obj: Any, folder: Path | None = None) -> None:
        atomic_write_text((folder or self.path) / name, json.dumps(obj, indent=2))

    def read_summary(self) -> dict:
        return self.read_json(self.SUMMARY) if (self.path / self.SUMMARY).is_file() else {}

    def read_metrics(self) -> dict:
        """``metrics.json``, checked to be what an evaluation writes: a mapping whose parts (``seen``, ``unseen``)
        and their ``overall`` / ``per_task`` / ``per_category`` entries are mappings."""
        if not (self.path / self.METRICS).is_file():
            raise FileNotFoundError(
                f"{self.path} has no {self.METRICS}: evaluate it first with `orchmoe eval {self.path}`"
            )
        metrics = self.read_json(self.METRICS)
        where = self.path / self.METRICS
        if not isinstance(metrics, dict):
            raise ArgumentsError(f"{where} holds a {type(metrics).__name__}, not the metrics of an evaluation")
        for part in ("seen", "unseen"):
            value = metrics.get(part, {})
            entries = list(value.values()) if isinstance(value, dict) else None
            if isinstance(value, dict) and isinstance(value.get("per_category"), dict):
                entries += list(value["per_category"].values())
            if entries is None or not all(isinstance(v, dict) for v in entries):
                raise ArgumentsError(f"{where}: {part!r} is not a mapping of overall / per-task / per-category scores")
        return metrics

    def write_results(self, metrics: dict, markdown: str, predictions: list[dict], folder: Path | None = None) -> Path:
        """metrics.json, metrics.md and predictions.jsonl of an evaluation (in ``folder``: an ``eval-*`` one)."""
        out = folder or self.path
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        atomic_write_text(out / self.PREDICTIONS, lines)
        self.write_json(self.METRICS, metrics, out)
        atomic_write_text(out / self.METRICS_MD, markdown)
        return out

    # -- the training log --------------------------------------------------------------------------
    def append_log(self, record: dict) -> None:
        """One line of ``train_log.jsonl`` (appended and flushed; a full disk names the file)."""
        path = self.path / self.LOG
        with reporting_disk_full(path), open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        p = self.path / self.LOG
        if not p.is_file():
            return []
        records = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def truncate_log(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log reads as one run."""
        if (self.path / self.LOG).is_file():
            keep = [r for r in self.read_log() if isinstance(r.get("step"), int) and r["step"] <= step]
            atomic_write_text(self.path / self.LOG, "".join(json.dumps(r) + "\n" for r in keep))

    def require_existing(self) -> RunFolder:
        """This folder if it exists as a folder: `FileNotFoundError` when nothing is there, `NotADirectoryError`
        naming what is there instead (a file, a link, a FIFO), so ``eval``/``report``/``analyze`` say which."""
        kind = path_kind(self.path)
        if kind is None:
            raise FileNotFoundError(f"run folder {str(self.path)!r} does not exist")
        if kind != "folder":
            raise NotADirectoryError(f"run folder {str(self.path)!r} is a {kind}, not a folder")
        return self

    # -- ownership: the marker and the lock --------------------------------------------------------
    def is_run_folder(self) -> bool:
        """Whether orchmoe made this folder (its marker: the only proof; an adapter copied in is not)."""
        return path_kind(self.path / self.MARKER) == "regular file"

    def _owned_names(self) -> list[Path]:
        p = self.path
        names = [p / n for n in (*self.FILES, self.ADAPTER, self.LOGS, self.ANALYSIS, "mlflow.db", "mlruns", "wandb")]
        names += [c for c in p.glob("checkpoint-*") if _CHECKPOINT.fullmatch(c.name)]
        names += list(p.glob("corrupt-checkpoint-*")) + list(p.glob("eval-*"))
        return [n for n in names if path_kind(n) is not None]

    def check_out(self) -> None:
        """Refuse an --out that is not a plain folder (a file, a link, ``/``, the home folder) or a folder orchmoe
        did not make that holds names orchmoe writes: it never writes over or deletes those."""
        p = self.path
        kind = path_kind(p)
        if kind not in (None, "folder"):
            raise ArgumentsError(f"--out {str(p)!r} is a {kind}, not a folder: choose another --out")
        resolved = p.resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
            raise ArgumentsError(f"--out {str(p)!r} is {resolved}: a run needs a folder of its own")
        if kind == "folder" and not self.is_run_folder():
            clash = sorted(n.name for n in self._owned_names())
            if clash:
                raise ArgumentsError(
                    f"{str(p)!r} is not an orchmoe run folder (no {self.MARKER} marker) but holds {', '.join(clash)}; "
                    "orchmoe never writes over or deletes files it did not write: choose a new or empty --out"
                )

    def claim(self, what: str = "run folder") -> None:
        """Make the folder (if needed), mark it, and take its lock for the life of the command (main process).

        Raises `FolderLockedError` naming the holder when another process holds it."""
        self.check_out()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(f"{what} {str(self.path)!r}")
        self.check_out()  # again, now that no other run can be changing it
        if not self.is_run_folder():
            stamp = {"format": "orchmoe-run", "orchmoe_version": __version__, "created": time.strftime("%F %T")}
            atomic_write_text(self.path / self.MARKER, json.dumps(stamp))

    def release(self) -> None:
        """Give the lock back (the kernel also drops it when the process dies)."""
        self._lock.release()

    def remove_if_unused(self) -> bool:
        """Remove the folder when it holds nothing but its marker and lock (a command that made it failed before
        writing anything): a mistyped option leaves no empty run folder behind. True when removed."""
        if self.locked or path_kind(self.path) != "folder":
            return False
        if {p.name for p in self.path.iterdir()} - {self.MARKER, self.LOCK}:
            return False
        for name in (self.MARKER, self.LOCK):
            if path_kind(self.path / name) == "regular file":
                os.unlink(self.path / name)
        try:
            os.rmdir(self.path)
        except OSError:  # something appeared meanwhile: keep it
            return False
        return True

    @property
    def locked(self) -> bool:
        return self._lock.held

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The Trainer's checkpoint folders, oldest first."""
        found = [(int(m.group(1)), c) for c in self.path.glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(c.name))]
        return [c for _, c in sorted(found) if c.is_dir()]

    #: what every checkpoint the Trainer writes for a routed adapter holds
    REQUIRED = (STATE, CONFIG, "optimizer.pt", "scheduler.pt", "adapter_config.json", "adapter_model.safetensors")

    def verify_checkpoint(self, ckpt: Path) -> str | None:
        """None when ``ckpt`` can be resumed from, else what is wrong with it: its manifest (sizes, sha256; a
        checkpoint without one, from an interrupted save or an older orchmoe, is checked by its content alone),
        its files, its trainer state (step = folder name), its configuration, its adapter (readable and finite),
        and that every pickled file reads as plain data (no object a pickle could construct)."""
        if (ckpt / self.MANIFEST).exists():
            problem = verify_manifest(ckpt, self.MANIFEST)
            if problem is not None:
                return problem
        missing = [r for r in self.REQUIRED if not (ckpt / r).is_file()]
        if not list(ckpt.glob("rng_state*.pth")):
            missing.append("rng_state.pth")
        if missing:
            return f"{', '.join(missing)} missing"
        try:
            state = read_json(ckpt / self.STATE, "trainer state")
        except (OSError, ValueError) as e:
            return f"{self.STATE} is unreadable ({e})"
        step = int(_CHECKPOINT.fullmatch(ckpt.name).group(1))
        if not isinstance(state, dict) or state.get("global_step") != step:
            return f"{self.STATE} says step {state.get('global_step') if isinstance(state, dict) else '?'}, not {step}"
        try:
            self.read_config(ckpt)
            _check_adapter_file(ckpt / "adapter_model.safetensors")
            for f in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("rng_state*.pth")):
                _plain_torch_load(f)
        except (ArgumentsError, ValueError, OSError, RuntimeError) as e:
            return str(e)
        return None

    # -- fresh start, resume, overwrite ----------------------------------------------------------------
    def plan(self, options: dict[str, Any], resume: bool, overwrite: bool, weight_free: set[str]) -> ResumePlan:
        """Fresh start or resume, and what to clean up; refuses to clobber a run silently.

        Args:
            options: this invocation's options (as written to config.yaml).
            resume: continue an unfinished run (``--no-resume``: refuse one).
            overwrite: delete what orchmoe wrote and start afresh.
            weight_free: options that may differ from the checkpoint's (they do not change the weights).
        """
        out, plan = self.path, ResumePlan()
        owned = self._owned_names()
        if overwrite:
            foreign = [f"{p.name}/{rel}" for p in owned if path_kind(p) == "folder" for rel in _foreign_files(p)]
            if foreign:
                raise ArgumentsError(
                    f"--overwrite would leave {', '.join(foreign[:3])} in orchmoe's own folders of {out}: orchmoe "
                    "never deletes files it did not write; move them out first"
                )
            plan.delete = owned
            return plan
        if (out / self.SUMMARY).is_file():
            raise ArgumentsError(
                f"{out} holds a finished run; pass --overwrite to train it again, use another --out, "
                f"or `orchmoe eval {out}` to re-score it"
            )
        found = self.checkpoints()
        if found and not resume:
            raise ArgumentsError(
                f"{out} holds checkpoints of an unfinished run and --no-resume was given; pass --overwrite to start "
                "afresh, or drop --no-resume to continue it"
            )
        bad: list[str] = []
        for ckpt in reversed(found):
            problem = self.verify_checkpoint(ckpt)
            if problem is None:
                plan.resume_from = ckpt
                break
            if not (ckpt / self.MANIFEST).exists():  # cut short while the Trainer wrote it: never complete
                plan.delete.append(ckpt)
                plan.notes.append(f"{ckpt.name} was never completed ({problem}); removed")
                continue
            bad.append(f"{ckpt.name}: {problem}")
            plan.set_aside.append(ckpt)
        found = [c for c in found if c not in plan.delete]
        if found and plan.resume_from is None:
            raise CheckpointError(
                f"{out} holds checkpoints but none can be resumed from ({'; '.join(bad)}); pass --overwrite to "
                "start afresh, or use another --out"
            )
        if plan.resume_from is None:  # killed before its first checkpoint (or in its final save): start again
            plan.delete = self._owned_names()
            if owned:
                plan.notes.append(
                    f"{out} holds an unfinished run without a usable checkpoint ({', '.join(p.name for p in owned)}); "
                    "starting it again from step 0"
                )
            return plan
        saved, _ = self.read_config(plan.resume_from)
        diff = {
            k: (saved.get(k), options.get(k))
            for k in set(saved) | set(options)
            if k not in weight_free and saved.get(k) != options.get(k)
        }
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ArgumentsError(
                f"{out} holds a checkpoint of a different configuration ({shown}); pass the same options to resume, "
                "or --overwrite / another --out to start afresh"
            )
        plan.notes += [f"checkpoint {b} is not usable; set aside as corrupt-{b.split(':')[0]}" for b in bad]
        return plan

    def apply(self, plan: ResumePlan) -> None:
        """Carry out a plan (main process, holding the lock): warn, set damaged checkpoints aside, delete."""
        for note in plan.notes:
            warnings.warn(note, stacklevel=3)
        for ckpt in plan.set_aside:
            aside = ckpt.with_name(f"corrupt-{ckpt.name}")
            self._delete(aside)
            os.replace(ckpt, aside)
        for p in plan.delete:
            self._delete(p)

    def _delete(self, p: Path) -> None:
        """Delete one of orchmoe's outputs: a file, or a folder's files orchmoe wrote (then the folder if empty)."""
        kind = path_kind(p)
        if kind is None:
            return
        if kind != "folder":
            p.unlink()
            return
        listed = _written_files(p)
        for rel in listed:
            target = p / rel
            if path_kind(target) in ("regular file", "symbolic link"):
                target.unlink()
        for sub in sorted((d for d in p.rglob("*") if d.is_dir() and not d.is_symlink()), key=lambda d: -len(d.parts)):
            _rmdir_if_empty(sub)
        if not _rmdir_if_empty(p):
            warnings.warn(f"{p} holds files orchmoe did not write; they were kept", stacklevel=4)


def _check_adapter_file(path: Path) -> None:
    """The checkpoint's adapter weights readable and finite (a run never resumes from a NaN adapter)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name} is not a readable safetensors file ({e})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path.name}: {bad[0]} holds NaN or infinite values")


def _plain_torch_load(path: Path) -> None:
    """Load a pickled checkpoint file as the Trainer will (``weights_only``, transformers' safe globals): a file that
    needs any other object to be built is refused here, before the Trainer meets it."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{path.name} is not a plain tensor file ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def _written_files(folder: Path) -> list[str]:
    """The files orchmoe (or the Trainer under it) wrote into one of its sub-folders: its manifest's list, the
    known names of analysis/eval folders, an adapter's files, tracker event files."""
    out: list[str] = []
    listed = False
    manifest = folder / RunFolder.MANIFEST
    if path_kind(manifest) == "regular file":
        try:  # never a path outside the folder (a received run's manifest may name any)
            out += list(manifest_files(folder, RunFolder.MANIFEST))
            listed = True
        except (OSError, ValueError):
            pass  # unreadable, or naming files outside: judged by the names below, as without one
        out.append(RunFolder.MANIFEST)
    name = folder.name
    if name == RunFolder.ANALYSIS:
        out += list(_SUBFOLDER_FILES["analysis"])
    elif name.startswith("eval-"):
        out += list(_SUBFOLDER_FILES["eval"])
    elif name == RunFolder.ADAPTER:
        out += ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    elif name == RunFolder.LOGS:
        out += [str(p.relative_to(folder)) for p in folder.rglob("events.out.tfevents.*")]
    elif name.startswith(("checkpoint-", "corrupt-checkpoint-")) and not listed:
        # a checkpoint cut short before its manifest (or with one that cannot be trusted): the Trainer's own names
        out += [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and _trainer_file(p.name)]
    return out


def _foreign_files(folder: Path) -> list[str]:
    """Files in one of orchmoe's sub-folders that orchmoe (or the Trainer under it) did not write."""
    written = set(_written_files(folder))
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in written
    )


def _trainer_file(name: str) -> bool:
    return name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
        "config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
    ) or name.startswith(("rng_state", "scaler"))


def _rmdir_if_empty(p: Path) -> bool:
    try:
        p.rmdir()
        return True
    except OSError:
        return False
