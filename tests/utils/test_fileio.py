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
