"""`orchmoe export` end to end on tiny trained runs: a bundle from a run's own prompts (OrchMoE, Poly), one
routing, a bare adapter folder with a prompts file, and the refusals (token routing, the adapter folder, a
non-empty or foreign destination); an export that fails half-way leaves nothing in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchmoe.adapters.bundle import BundleManifest, lora_name
from orchmoe.cli import main
from recipe_helpers import SEEN, SMALL_DATA, tiny_train_argv

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def runs(tiny_llama, superni, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for method in ("orchmoe", "poly", "molora"):
        run = root / method
        argv = tiny_train_argv(tiny_llama, superni, run, **SMALL_DATA, lr=None)
        assert main([*argv, "--method", method, "--max-steps", "2", "--no-eval"]) == 0
        out[method] = run
    return out


def _export(*args) -> int:
    return main(["export", *map(str, args), "--device", "cpu"])


def test_orchmoe_bundle_from_the_runs_prompts(runs, tmp_path, capsys):
    dest = tmp_path / "bundle"
    assert _export(runs["orchmoe"], "--bundle", dest, "--check", 6, "--max-new-tokens", 3) == 0
    printed = capsys.readouterr().out
    m = BundleManifest.read(dest)
    n = len(SEEN) * (SMALL_DATA["train_per_task"] + SMALL_DATA["eval_per_task"]) + SMALL_DATA["unseen_per_task"]
    assert m.data["prompts"]["count"] == n and str(runs["orchmoe"]) in m.data["prompts"]["source"]
    assert m.data["prompts"]["by_split"] == {"train": 24, "eval": 6, "unseen": 2}
    assert sum(e["prompts"] for e in m.data["loras"].values()) == n
    assert all(p.is_dir() and (p / "adapter_model.safetensors").is_file() for p in m.lora_paths().values())
    a = m.data["agreement"]
    assert a["prompts"] == 6 and f"{a['answers_equal']}/6 prompts" in printed
    assert "vllm serve" in printed and "--lora-modules" in printed
    assert (dest / "router.safetensors").is_file() and not list(tmp_path.glob(".bundle*"))


def test_poly_bundle_and_one_task(runs, tmp_path):
    dest = tmp_path / "bundle"
    assert _export(runs["poly"], "--bundle", dest, "--check", 4, "--max-new-tokens", 3) == 0
    m = BundleManifest.read(dest)
    assert m.names == [lora_name(task_id=t) for t in (0, 1, 2, -1)]
    assert m.data["exact"] and m.data["agreement"]["rate"] == 1.0
    task = sorted(m.data["route"]["task_to_id"])[1]
    assert m.lora_for(task=task) == lora_name(task_id=m.data["route"]["task_to_id"][task])
    assert _export(runs["poly"], "--out", tmp_path / "one", "--task", task) == 0
    note = json.loads((tmp_path / "one" / "orchmoe_export.json").read_text())
    assert note["routing"] == {"task_id": m.data["route"]["task_to_id"][task]}


def test_bare_adapter_with_a_prompts_file(runs, tmp_path, capsys):
    adapter = shutil.copytree(runs["orchmoe"] / "adapter", tmp_path / "adapter")
    assert _export(adapter, "--bundle", tmp_path / "b") == 2
    assert "--prompts FILE" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Definition: Name the capital.\n\nNow complete the following example -\nInput: France\nOutput:"},
        {"definition": "Give a hypernym of the word.", "input": "dog", "task": "x"},
        {"definition": "Give a hypernym.", "input": "cat", "examples": [{"input": "rose", "output": "flower"}]},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert _export(adapter, "--bundle", tmp_path / "b", "--prompts", prompts, "--check", 3, "--max-new-tokens", 2) == 0
    m = BundleManifest.read(tmp_path / "b")
    assert m.data["prompts"]["count"] == 3 and "p.jsonl" in m.data["prompts"]["source"]
    assert m.data["agreement"]["prompts"] == 3
    prompts.write_text('{"prompt": "ok"}\n{"input": "no definition"}\n')
    assert _export(adapter, "--bundle", tmp_path / "c", "--prompts", prompts) == 2
    assert "p.jsonl:2" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_refusals(runs, tmp_path, capsys):
    assert _export(runs["molora"], "--bundle", tmp_path / "m") == 2
    assert "routes every token separately" in capsys.readouterr().err
    assert _export(runs["poly"], "--bundle", runs["poly"] / "adapter") == 2
    assert "the adapter folder itself" in capsys.readouterr().err
    assert _export(runs["poly"], "--out", runs["poly"] / "adapter" / "inner", "--task-id", 0) == 2
    assert "inside the adapter folder" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _export(runs["poly"], "--bundle", mine, "--check", 0) == 2
    assert "not empty: pass --overwrite" in capsys.readouterr().err
    assert _export(runs["poly"], "--bundle", mine, "--check", 0, "--overwrite") == 2
    assert "not an orchmoe export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert _export(runs["poly"], "--bundle", tmp_path / "b", "--task-id", 1) == 2
    assert "use them with --out" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_export(runs, tmp_path, capsys):
    dest = tmp_path / "b"
    assert _export(runs["poly"], "--bundle", dest, "--check", 0) == 0
    assert _export(runs["poly"], "--bundle", dest, "--check", 0) == 2
    (dest / "loras" / "notes.txt").write_text("mine, put beside the LoRAs")
    assert _export(runs["poly"], "--bundle", dest, "--check", 0, "--overwrite") == 2  # never deletes a user's file
    assert "files no export writes (loras/notes.txt)" in capsys.readouterr().err
    (dest / "loras" / "notes.txt").unlink()
    assert _export(runs["poly"], "--bundle", dest, "--check", 0, "--overwrite") == 0
    assert BundleManifest.read(dest).names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_failure_half_way_leaves_no_bundle(runs, tmp_path, monkeypatch, capsys):
    import orchmoe.adapters.bundle.writer as writer

    def fail(*args, **kwargs):
        raise RuntimeError("disk pulled out mid-export")

    monkeypatch.setattr(writer, "write_router", fail)  # after the LoRAs were written
    assert _export(runs["poly"], "--bundle", tmp_path / "b", "--check", 0) == 2
    assert "disk pulled out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
