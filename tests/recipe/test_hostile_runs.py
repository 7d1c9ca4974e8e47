"""Hostile and careless use of run folders (issue 12), table-driven: kills and corruption (the same command
resumes from the newest intact checkpoint, bit-exact), folders orchmoe did not make (never emptied),
refusals that keep every file, locks, full disks and planted pickles.

Every run here is the 6-step tiny run of `hostile_helpers.train_args` (checkpoints at steps 2 and 4); a
"killed" folder is a finished one without its adapter and summary, i.e. killed during step 5 or 6.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hostile_helpers import assert_clear_error, run_cli, same_adapter, train_args, tree_bytes
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.utils.fileio import DiskFullError, is_disk_full, reporting_disk_full, write_manifest
from orchmoe.utils.folder_lock import FolderLock

CKPT = "checkpoint-{}"


@pytest.fixture(scope="module")
def reference(tiny_llama, superni, tmp_path_factory) -> Path:
    """The unbroken run every resumed one must equal."""
    from orchmoe.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_llama, superni, out)) == 0
    assert [p.name for p in RunFolder(out).checkpoints()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def killed_copy(reference: Path, dest: Path) -> Path:
    """The reference as if killed during steps 5-6: no adapter, no summary, no final checkpoint, no late log lines."""
    run = shutil.copytree(reference, dest)
    (run / "train_summary.json").unlink()
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoint-6")
    return run


def log_steps(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunFolder(run).read_log()]


# -- spoilers: each one a kill or a corruption -------------------------------------------------------------------
def truncate(rel: str):
    def spoil(run: Path) -> None:
        p = run / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return spoil


def flip_byte(rel: str):
    def spoil(run: Path) -> None:
        p = run / rel
        data = bytearray(p.read_bytes())
        data[-5] ^= 0xFF
        p.write_bytes(bytes(data))

    return spoil


def write(rel: str, content: bytes | str):
    def spoil(run: Path) -> None:
        p = run / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return spoil


def append(rel: str, text: str):
    def spoil(run: Path) -> None:
        with open(run / rel, "a") as fh:
            fh.write(text)

    return spoil


def delete(rel: str):
    def spoil(run: Path) -> None:
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return spoil


def both(*spoilers):
    def spoil(run: Path) -> None:
        for s in spoilers:
            s(run)

    return spoil


def set_state(step: int, manifest: bool):
    """Edit trainer_state.json's global_step (re-writing the manifest when ``manifest``: a consistent forgery)."""

    def spoil(run: Path) -> None:
        ckpt = run / CKPT.format(4)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["global_step"] = step
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        if manifest:
            write_manifest(ckpt)

    return spoil


class Payload:
    """A pickle that makes a folder when unpickled: proof that code ran."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return os.mkdir, (self.flag,)


def plant_pickle(rel: str, rewrite_manifest: bool):
    def spoil(run: Path) -> None:
        torch.save({"python": Payload(run.parent / "PWNED"), "torch": torch.zeros(1)}, run / rel)
        if rewrite_manifest:
            write_manifest((run / rel).parent)

    return spoil


def no_manifests(run: Path) -> None:
    for ckpt in RunFolder(run).checkpoints():
        (ckpt / "manifest.json").unlink()


def _nan_adapter(step: int):
    def spoil(run: Path) -> None:
        from safetensors.torch import load_file, save_file

        p = run / CKPT.format(step) / "adapter_model.safetensors"
        t = load_file(str(p))
        next(v for k, v in t.items() if k.endswith("lora_B"))[0, 0, 0] = float("nan")
        save_file(t, str(p))

    return spoil


def _remanifest(step: int):
    def spoil(run: Path) -> None:
        write_manifest(run / CKPT.format(step))

    return spoil


def no_manifests_on_4(run: Path) -> None:
    (run / CKPT.format(4) / "manifest.json").unlink()


def stale_lock(run: Path) -> None:
    (run / ".orchmoe-run.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))


def partial_adapter(run: Path) -> None:
    """A kill inside the final save of a run without checkpoints: half the weights, no config."""
    for ckpt in RunFolder(run).checkpoints():
        shutil.rmtree(ckpt)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')


# name, spoil, checkpoint resumed from (None: starts again at step 0), checkpoints set aside as corrupt
RESUMES = [
    ("intact", lambda run: None, 4, []),
    ("partial-newer-checkpoint", write(CKPT.format(6) + "/optimizer.pt", b"PK\x03"), 4, []),
    ("log-cut-mid-line", append("train_log.jsonl", '{"step": 6, "lo'), 4, []),
    ("stale-lock-file", stale_lock, 4, []),
    ("truncated-optimizer", truncate(CKPT.format(4) + "/optimizer.pt"), 2, [4]),
    ("truncated-scheduler", truncate(CKPT.format(4) + "/scheduler.pt"), 2, [4]),
    ("flipped-adapter-byte", flip_byte(CKPT.format(4) + "/adapter_model.safetensors"), 2, [4]),
    ("empty-config", write(CKPT.format(4) + "/config.yaml", ""), 2, [4]),
    ("garbage-config", write(CKPT.format(4) + "/config.yaml", b"\x00\xff\x13garbage"), 2, [4]),
    ("global-step-999", set_state(999, manifest=False), 2, [4]),
    ("global-step-999-forged-manifest", set_state(999, manifest=True), 2, [4]),
    ("trainer-state-deleted", delete(CKPT.format(4) + "/trainer_state.json"), 2, [4]),
    ("rng-state-deleted", delete(CKPT.format(4) + "/rng_state.pth"), 2, [4]),
    ("manifest-garbage", write(CKPT.format(4) + "/manifest.json", '{"files": 3'), 2, [4]),
    ("planted-pickle-rng", plant_pickle(CKPT.format(4) + "/rng_state.pth", rewrite_manifest=True), 2, [4]),
    ("planted-pickle-optimizer", plant_pickle(CKPT.format(4) + "/optimizer.pt", rewrite_manifest=True), 2, [4]),
    ("nan-adapter-forged-manifest", both(_nan_adapter(4), _remanifest(4)), 2, [4]),
    ("no-manifests-intact", no_manifests, 4, []),
    # without its manifest a damaged checkpoint is one cut short while written: removed, never resumed from
    ("no-manifest-truncated-optimizer", both(no_manifests_on_4, truncate(CKPT.format(4) + "/optimizer.pt")), 2, []),
    ("no-manifest-global-step-999", both(no_manifests_on_4, set_state(999, manifest=False)), 2, []),
    (
        "no-manifest-planted-pickle",
        both(no_manifests_on_4, plant_pickle(CKPT.format(4) + "/rng_state.pth", False)),
        2,
        [],
    ),
    ("killed-after-adapter-before-summary", lambda run: None, 4, []),  # (the adapter is put back below)
    (
        "killed-in-first-checkpoint",
        both(delete(CKPT.format(2)), delete(CKPT.format(4)), write(CKPT.format(2) + "/rng_state.pth", b"PK")),
        None,
        [],
    ),
    ("killed-in-final-save-without-checkpoints", partial_adapter, None, []),
    ("killed-before-any-checkpoint", both(delete(CKPT.format(2)), delete(CKPT.format(4))), None, []),
]


@pytest.mark.parametrize("name, spoil, start, aside", RESUMES, ids=[r[0] for r in RESUMES])
def test_same_command_resumes_from_the_newest_intact_checkpoint(
    name, spoil, start, aside, reference, tiny_llama, superni, tmp_path, capsys, recwarn
):
    run = killed_copy(reference, tmp_path / "run")
    if name == "killed-after-adapter-before-summary":
        shutil.copytree(reference / "adapter", run / "adapter")
    spoil(run)
    rc, out, err = run_cli(train_args(tiny_llama, superni, run), capsys)
    assert rc == 0, err
    said = " ".join(str(w.message) for w in recwarn)
    if start is None:
        assert "resuming" not in out and "starting it again from step 0" in said
    else:
        assert f"resuming from {run / CKPT.format(start)}" in out
    assert same_adapter(run, reference)  # bit-exact, whichever checkpoint it came from
    assert log_steps(run) == log_steps(reference)  # one run's log, no duplicate or cut records
    assert sorted(p.name for p in run.glob("corrupt-*")) == [f"corrupt-checkpoint-{s}" for s in aside]
    for s in aside:
        assert f"checkpoint-{s}" in said and "set aside" in said
    assert not (tmp_path / "PWNED").exists()  # no planted pickle ever ran


# -- refusals: one clear line, and every file as it was -----------------------------------------------------------
def _finished(reference: Path, dest: Path) -> Path:
    return shutil.copytree(reference, dest)


def _foreign(dest: Path, *names: str) -> Path:
    dest.mkdir()
    for n in names:
        (dest / n).write_text(f"# my own {n}, written by hand\n")
    return dest


# name, make the folder (reference, tmp) -> --out, extra flags, message
REFUSALS = [
    ("finished-run", lambda ref, tmp: _finished(ref, tmp / "run"), [], "holds a finished run; pass --overwrite"),
    (
        "a-copied-run-without-marker",
        lambda ref, tmp: _strip_marker(_finished(ref, tmp / "run")),
        [],
        "is not an orchmoe run folder (no .orchmoe-run marker)",
    ),
    (
        "changed-configuration",
        lambda ref, tmp: killed_copy(ref, tmp / "run"),
        ["--lr", "5e-3"],
        "a checkpoint of a different configuration (learning_rate: checkpoint 0.01 vs now 0.005)",
    ),
    (
        "no-resume-with-checkpoints",
        lambda ref, tmp: killed_copy(ref, tmp / "run"),
        ["--no-resume"],
        "--no-resume was given",
    ),
    (
        "every-checkpoint-corrupt",
        lambda ref, tmp: _all_corrupt(killed_copy(ref, tmp / "run")),
        [],
        "holds checkpoints but none can be resumed from (checkpoint-4: optimizer.pt has",
    ),
    (
        "only-checkpoint-planted-pickle",
        lambda ref, tmp: _only_planted(killed_copy(ref, tmp / "run")),
        [],
        "none can be resumed from",
    ),
    (
        "hand-written-config",
        lambda ref, tmp: _foreign(tmp / "mine", "config.yaml"),
        [],
        "is not an orchmoe run folder (no .orchmoe-run marker) but holds config.yaml",
    ),
    (
        "hand-written-config-and-log",
        lambda ref, tmp: _foreign(tmp / "mine", "config.yaml", "train_log.jsonl"),
        [],
        "holds config.yaml, train_log.jsonl",
    ),
    (
        "hand-written-config-overwrite",
        lambda ref, tmp: _foreign(tmp / "mine", "config.yaml"),
        ["--overwrite"],
        "orchmoe never writes over or deletes files it did not write",
    ),
    (
        "foreign-metrics-and-analysis",
        lambda ref, tmp: _foreign(tmp / "mine", "metrics.md", "analysis"),
        ["--overwrite"],
        "holds analysis, metrics.md",
    ),
    ("out-is-a-file", lambda ref, tmp: _file(tmp / "notes.txt"), [], "is a regular file, not a folder"),
    ("out-is-a-link", lambda ref, tmp: _link(tmp / "link", tmp / "elsewhere"), [], "is a symbolic link, not a folder"),
    ("out-below-a-file", lambda ref, tmp: _file(tmp / "notes.txt") / "run", [], "Not a directory"),
]


def _strip_marker(run: Path) -> Path:
    (run / ".orchmoe-run").unlink()
    return run


def _all_corrupt(run: Path) -> Path:
    for s in (2, 4):
        truncate(CKPT.format(s) + "/optimizer.pt")(run)
    return run


def _only_planted(run: Path) -> Path:
    shutil.rmtree(run / CKPT.format(4))
    plant_pickle(CKPT.format(2) + "/rng_state.pth", rewrite_manifest=True)(run)
    return run


def _link(p: Path, target: Path) -> Path:
    target.mkdir()
    p.symlink_to(target)
    return p


def _file(p: Path) -> Path:
    p.write_text("my notes\n")
    return p


@pytest.mark.parametrize("name, make, extra, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_keep_every_file(name, make, extra, message, reference, tiny_llama, superni, tmp_path, capsys):
    out = make(reference, tmp_path)
    watched = out if out.is_dir() else tmp_path
    before = tree_bytes(watched)
    rc, _, err = run_cli(train_args(tiny_llama, superni, out, *extra), capsys)
    assert_clear_error(rc, err, message)
    after = tree_bytes(watched)
    after.pop(".orchmoe-run.lock", None)
    before.pop(".orchmoe-run.lock", None)
    assert after == before  # nothing deleted, nothing changed, nothing added (but the emptied lock file)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("extra", [["--overwrite"], []], ids=["overwrite", "resume"])
def test_a_manifest_naming_a_file_outside_the_run_never_gets_it_deleted(
    extra, reference, tiny_llama, superni, tmp_path, capsys
):
    """A received run folder whose checkpoint manifests name files elsewhere (absolute paths): --overwrite deletes
    only what is inside the run folder; resuming refuses such checkpoints, naming the entry."""
    run = killed_copy(reference, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for step in (2, 4):
        manifest = json.loads((run / CKPT.format(step) / "manifest.json").read_text())
        manifest["files"][str(victim)] = {"size": 9, "sha256": "0"}
        (run / CKPT.format(step) / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(train_args(tiny_llama, superni, run, *extra), capsys)
    assert victim.read_text() == "precious\n"
    if extra:
        assert rc == 0 and same_adapter(run, reference), err  # started afresh: the Trainer's files deleted by name
    else:  # such checkpoints are not resumed from, and named
        assert_clear_error(rc, err, "manifest.json names")
        assert "a path outside its folder" in err


@pytest.mark.parametrize("out_arg", [".", ""], ids=["dot", "empty"])
def test_current_directory_files_are_never_clobbered(out_arg, tiny_llama, superni, tmp_path, capsys, monkeypatch):
    work = _foreign(tmp_path / "work", "config.yaml", "README.md")
    monkeypatch.chdir(work)
    before = tree_bytes(work)
    rc, _, err = run_cli(train_args(tiny_llama, superni, out_arg), capsys)
    assert_clear_error(rc, err, "not an orchmoe run folder" if out_arg == "." else "--out (output_dir) is empty")
    assert tree_bytes(work) == before


def test_out_dot_in_a_folder_of_other_files_trains_beside_them(tiny_llama, superni, tmp_path, capsys, monkeypatch):
    work = _foreign(tmp_path / "work", "README.md", "my.yaml")
    monkeypatch.chdir(work)
    rc, _, err = run_cli(train_args(tiny_llama, superni, ".", "--checkpoint-every", "0", "--max-steps", "1"), capsys)
    assert rc == 0, err
    assert (work / "README.md").read_text().startswith("# my own") and (work / "my.yaml").is_file()
    assert (work / ".orchmoe-run").is_file() and (work / "adapter").is_dir()
    rc, _, err = run_cli(
        train_args(tiny_llama, superni, ".", "--checkpoint-every", "0", "--max-steps", "1", "--overwrite"), capsys
    )
    assert rc == 0, err  # --overwrite empties only what orchmoe wrote
    assert (work / "README.md").is_file() and (work / "my.yaml").is_file()


def test_overwrite_deletes_only_orchmoe_files(reference, tiny_llama, superni, tmp_path, capsys):
    run = shutil.copytree(reference, tmp_path / "run")
    (run / "notes.txt").write_text("keep me")
    (run / "adapter" / "my-notes.md").write_text("mine, inside orchmoe's folder")
    before = tree_bytes(run)
    rc, _, err = run_cli(train_args(tiny_llama, superni, run, "--overwrite"), capsys)
    assert_clear_error(rc, err, "would leave adapter/my-notes.md in orchmoe's own folders")
    assert tree_bytes(run) == before  # refused before anything was deleted
    (run / "adapter" / "my-notes.md").unlink()
    (run / CKPT.format(4) / "manifest.json").unlink()  # (a checkpoint without its list: the Trainer's names go)
    rc, _, err = run_cli(train_args(tiny_llama, superni, run, "--overwrite"), capsys)
    assert rc == 0, err
    assert (run / "notes.txt").read_text() == "keep me" and same_adapter(run, reference)
    assert RunFolder(run).verify_checkpoint(run / CKPT.format(4)) is None


# -- locks ---------------------------------------------------------------------------------------------------
_HOLDER = (
    "import sys, time; from orchmoe.utils.folder_lock import FolderLock; lock = FolderLock(sys.argv[1]); "
    "lock.acquire('x'); print('locked', flush=True); time.sleep(120)"
)


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_a_locked_run_folder_is_refused_naming_the_holder(extra, reference, tiny_llama, superni, tmp_path, capsys):
    run = killed_copy(reference, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / ".orchmoe-run.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = tree_bytes(run)
        rc, _, err = run_cli(train_args(tiny_llama, superni, run, *extra), capsys)
        assert_clear_error(rc, err, f"is in use by another orchmoe run (pid {holder.pid} on host ")
        assert tree_bytes(run) == before
    finally:
        holder.kill()
        holder.wait()
    rc, out, err = run_cli(train_args(tiny_llama, superni, run), capsys)  # the holder died: its lock went with it
    assert rc == 0 and "resuming from" in out and same_adapter(run, reference), err


def _command(command: str, run: Path, model: Path, data: Path) -> list[str]:
    """eval re-scores the run's own tasks (its --data would score other data); analyze is told where the data are."""
    return [command, str(run), "--model", str(model)] + (["--data", str(data)] if command == "analyze" else [])


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_eval_and_analyze_wait_for_no_one_and_write_nothing_into_a_locked_folder(
    command, reference, tiny_llama, superni, tmp_path, capsys
):
    """`orchmoe eval` / `analyze` write into the run folder: not while another process (a training) holds it."""
    run = shutil.copytree(reference, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / ".orchmoe-run.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = tree_bytes(run)
        rc, _, err = run_cli(_command(command, run, tiny_llama, superni), capsys)
        assert_clear_error(rc, err, f"is in use by another orchmoe run (pid {holder.pid} on host ")
        assert tree_bytes(run) == before
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = run_cli(_command(command, run, tiny_llama, superni), capsys)
    assert rc == 0, err
    assert (run / ("metrics.json" if command == "eval" else "analysis/analysis.json")).is_file()
    assert (run / ".orchmoe-run.lock").read_text() == ""  # released


def test_two_trainings_into_one_folder(tiny_llama, superni, tmp_path, capsys):
    """The second `orchmoe train` on a folder in use is refused; the first finishes untouched."""
    run = tmp_path / "run"
    args = train_args(tiny_llama, superni, run, "--max-steps", "150", "--checkpoint-every", "50")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "orchmoe", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        lock = run / ".orchmoe-run.lock"
        while not (lock.is_file() and lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
            time.sleep(0.02)
        rc, _, err = run_cli(args, capsys)
        assert_clear_error(rc, err, f"pid {first.pid} on host")
        rc, _, err = run_cli(args[:-2] + ["--out", str(run), "--overwrite"], capsys)
        assert_clear_error(rc, err, "is in use by another orchmoe run")
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 150
    assert [r["step"] for r in RunFolder(run).read_log()] == list(range(1, 151))
    assert lock.read_text() == ""  # released: no stale holder shown to the next run


def test_the_lock_is_released_when_a_run_fails(tiny_llama, superni, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_cli(train_args(tiny_llama, superni, run, "--tasks", "no_such_task"), capsys)
    assert_clear_error(rc, err, "no_such_task")  # fails after the folder was claimed
    rc, _, err = run_cli(train_args(tiny_llama, superni, run, "--max-steps", "1", "--checkpoint-every", "0"), capsys)
    assert rc == 0, err


# -- full disks --------------------------------------------------------------------------------------------------
def _full_torch_save(monkeypatch, when: str) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if when in str(getattr(f, "name", f)):
            Path(str(f)).write_bytes(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _full_safetensors(monkeypatch, when: str) -> None:
    """PEFT writes the adapter's weights with safetensors: a full disk there, outside any checkpoint."""
    import peft.peft_model
    from safetensors import SafetensorError

    real = peft.peft_model.safe_save_file

    def save_file(tensors, path, *args, **kwargs):
        if when in str(path) and "checkpoint-" not in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


# name, make the disk full, where the message says it was writing, checkpoints left, resumed from on the re-run
FULL_DISKS = [
    (
        "second-checkpoint-optimizer",
        lambda mp: _full_torch_save(mp, "checkpoint-4/optimizer.pt"),
        "checkpoint-4/",
        [2],
        2,
    ),
    ("first-checkpoint-rng", lambda mp: _full_torch_save(mp, "checkpoint-2/rng_state.pth"), "checkpoint-2/", [], None),
    ("final-adapter", lambda mp: _full_safetensors(mp, "adapter_model.safetensors"), "adapter", [2, 4, 6], 6),
]


@pytest.mark.parametrize("name, fill, where, left, start", FULL_DISKS, ids=[f[0] for f in FULL_DISKS])
def test_full_disk_is_named_and_the_same_command_resumes(
    name, fill, where, left, start, reference, tiny_llama, superni, tmp_path, capsys, monkeypatch, recwarn
):
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        fill(mp)
        rc, _, err = run_cli(train_args(tiny_llama, superni, run), capsys)
    assert_clear_error(rc, err, "no space left on the device while writing")
    assert where in err
    folder = RunFolder(run)
    assert [int(p.name.split("-")[1]) for p in folder.checkpoints()] == left
    assert all(folder.verify_checkpoint(p) is None for p in folder.checkpoints())  # older checkpoints untouched
    assert not list(run.rglob(".*.tmp-*"))  # no half-written file left behind
    rc, out, err = run_cli(train_args(tiny_llama, superni, run), capsys)
    assert rc == 0, err
    if start is None:  # the full disk hit the first checkpoint: nothing to resume, the run starts again
        assert "resuming" not in out and "starting it again from step 0" in " ".join(str(w.message) for w in recwarn)
    else:
        assert f"resuming from {run / CKPT.format(start)}" in out
    assert same_adapter(run, reference) and log_steps(run) == log_steps(reference)


class _FullDevice:
    """A file whose writes fail as a full device's do (the OSError a write(2) returns with ENOSPC)."""

    name = "fake-device"

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


def test_full_disk_through_the_writers_own_error_wrapping(tmp_path):
    """The device's OSError arrives through torch's writer (which may wrap it in a RuntimeError, "unexpected
    pos ..."): it becomes one DiskFullError naming the file."""
    with pytest.raises(DiskFullError, match="no space left on the device while writing somewhere/optimizer.pt") as info:
        with reporting_disk_full("somewhere/optimizer.pt"):
            torch.save({"w": torch.zeros(4096)}, _FullDevice())
    assert info.value.__cause__ is not None  # the writer's own error is kept as the cause (--debug shows it)
    try:  # what torch raises when a write of the zip container comes up short on a full tmpfs (seen in a probe)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as e:
        assert is_disk_full(e)
    with pytest.raises(RuntimeError, match="not a disk"), reporting_disk_full(tmp_path / "x"):
        raise RuntimeError("not a disk problem")  # other errors pass through unchanged


def test_folder_lock_in_one_process(tmp_path):
    a, b = FolderLock(tmp_path / "lock"), FolderLock(tmp_path / "lock")
    a.acquire("the folder")
    with pytest.raises(RuntimeError, match=f"the folder is in use by another orchmoe run \\(pid {os.getpid()}"):
        b.acquire("the folder")
    a.release()
    b.acquire("the folder")
    assert b.held and not a.held
    b.release()


# -- the main script ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, env_out, out",
    [
        ([], None, "runs/main"),
        (["--max-steps", "0"], None, "runs/main-base"),
        (["--max-steps=0"], None, "runs/main-base"),
        (["--max-steps", "10"], None, "runs/main"),
        (["--max-steps", "0"], "runs/x", "runs/x"),
    ],
    ids=["main", "baseline", "baseline-equals", "shorter", "out-env"],
)
def test_main_script_resumes_and_keeps_the_baseline_apart(args, env_out, out, tmp_path):
    """scripts/main.sh with `orchmoe` stubbed: never --overwrite (a killed job resumes), the untrained baseline
    in its own folder (it never replaces runs/main)."""
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "main.sh", tmp_path / "scripts" / "main.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{tmp_path}/bin:$PATH"\n')
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "orchmoe"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if env_out:
        env["OUT"] = env_out
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "main.sh"), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert "--overwrite" not in argv
    assert argv[argv.index("--out") + 1] == out
    assert argv[len(argv) - len(args) :] == args  # the user's flags come last: they override the defaults


def test_main_script_shows_a_finished_run_instead_of_failing(tmp_path):
    """A second `bash scripts/main.sh` after a finished main job prints its results (exit 0) and trains nothing."""
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "main.sh", tmp_path / "scripts" / "main.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{tmp_path}/bin:$PATH"\n')
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "orchmoe").write_text(f'#!/usr/bin/env bash\ntouch "{tmp_path}/trained"\n')
    (tmp_path / "bin" / "orchmoe").chmod(0o755)
    run = tmp_path / "runs" / "main"
    run.mkdir(parents=True)
    (run / "train_summary.json").write_text("{}")
    (run / "metrics.md").write_text("| seen | 47.0 |\n")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "main.sh")], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0 and "| seen | 47.0 |" in done.stdout and "holds a finished run" in done.stdout
    assert not (tmp_path / "trained").exists()
    again = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "main.sh"), "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and (tmp_path / "trained").exists()  # --overwrite trains again
