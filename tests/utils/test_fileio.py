"""`atomic_folder`: a folder appears whole or not at all, replaces an earlier one whole, and the hidden
half-written siblings of killed writers are swept once their process is gone."""

from __future__ import annotations

import os

import pytest

from orchmoe.utils.fileio import atomic_folder


def test_a_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as stage:
        (stage / "a.txt").write_text("1")
        assert not dest.exists() and stage.parent == tmp_path and stage.name.startswith(".out.partial-")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with atomic_folder(dest) as stage:
        (stage / "b.txt").write_text("2")
        assert (dest / "a.txt").is_file()  # the old folder stays whole until the rename
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_leaves_the_old_folder_and_no_partial(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(dest) as stage:
            (stage / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "old.txt").read_text() == "old"


def test_stale_partials_of_dead_processes_are_swept(tmp_path):
    dead = tmp_path / ".out.partial-999999999"  # no such pid
    live = tmp_path / f".out.partial-{os.getppid()}"  # a running process: left alone
    foreign = tmp_path / ".out.partial-999999998"  # no marker: not ours
    for p in (dead, live, foreign):
        p.mkdir()
    (dead / ".orchmoe-partial").touch()
    (live / ".orchmoe-partial").touch()
    with atomic_folder(tmp_path / "out") as stage:
        (stage / "x").write_text("x")
    assert not dead.exists() and live.is_dir() and foreign.is_dir()


# -- killed writers: what they leave is always swept ----------------------------------------------------------
_KILLED_WRITER = """
import os, shutil, sys
from pathlib import Path
from orchmoe.utils import fileio
dest, where = Path(sys.argv[1]), sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), 9)
if where == "fsync":  # flushing the new folder: the slow part
    fileio.fsync_tree = die
else:  # deleting the old folder after the swap
    real = shutil.rmtree
    inside = lambda p: Path(p).parent.name.startswith(".out.partial-")  # a sub-folder of the swapped-out one
    shutil.rmtree = lambda p, *a, **k: die() if inside(p) else real(p, *a, **k)
    fileio.shutil.rmtree = shutil.rmtree
with fileio.atomic_folder(dest) as stage:
    (stage / "new.txt").write_text("new")
"""


@pytest.mark.parametrize("where", ["fsync", "discard"])
def test_a_writer_killed_while_flushing_or_discarding_leaves_a_stage_the_next_one_sweeps(where, tmp_path):
    import subprocess
    import sys

    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "old.txt").write_text("old")
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(dest), where], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(left) == 1 and (left[0] / ".orchmoe-partial").is_file()  # marked: the next writer may delete it
    assert sorted(p.name for p in dest.iterdir()) == (["sub"] if where == "fsync" else ["new.txt"])
    with atomic_folder(dest) as stage:
        (stage / "again.txt").write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- reading what a user gives ---------------------------------------------------------------------------------
def test_json_lines_name_the_file_and_line_of_every_problem(tmp_path):
    from orchmoe.utils.fileio import FileFormatError, read_json_lines

    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": 2}\n')  # a BOM, a blank line
    assert read_json_lines(f) == [(1, {"a": 1}), (3, {"b": 2})]
    for content, message in (
        (b'{"a": 1}\n{"b": "caf\xe9"}\n', "rows.jsonl line 2: not UTF-8 text"),
        (b'{"a": 1}\n{oops\n', "rows.jsonl line 2: not valid JSON"),
        (b"[1, 2]\n", "rows.jsonl line 1: a row must be a JSON object, got list"),
        (b"[" * 100_000 + b"\n", "rows.jsonl line 1: JSON nested too deeply"),
    ):
        f.write_bytes(content)
        with pytest.raises(FileFormatError, match=message.replace("(", r"\(")):
            read_json_lines(f)
    os.unlink(f)
    os.mkfifo(f)
    with pytest.raises(FileFormatError, match="rows.jsonl is a FIFO"):  # named, never opened (it would block)
        read_json_lines(f)


@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside.txt", "a/../../outside.txt"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(entry, tmp_path):
    import json

    from orchmoe.utils.fileio import FileFormatError, manifest_files, verify_manifest, write_manifest

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    write_manifest(folder)
    assert list(manifest_files(folder)) == ["a.txt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][entry] = {"size": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileFormatError, match="a path outside its folder"):
        manifest_files(folder)
    assert "a path outside its folder" in verify_manifest(folder)
