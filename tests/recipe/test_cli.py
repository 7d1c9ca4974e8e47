"""The `orchmoe` command: config files and overrides, report, analyze, and its error messages."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from orchmoe.cli import main
from orchmoe.core.config import METHODS
from orchmoe.recipe.args import DataArguments, EvalArguments, ModelArguments
from recipe_helpers import REPO, SMALL_DATA, save_tiny, tiny_train_argv  # noqa: F401


def base_args(tiny_llama: Path, superni: Path, out: Path) -> list[str]:
    return tiny_train_argv(tiny_llama, superni, out, **SMALL_DATA, lr=None)


@pytest.fixture(scope="module")
def two_runs(tiny_llama, superni, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for method in ("lora", "poly"):
        out = root / method
        assert main(base_args(tiny_llama, superni, out) + ["--method", method, "--max-steps", "2"]) == 0
        runs.append(out)
    return runs


def test_config_file_with_command_line_override(tiny_llama, superni, tmp_path):
    cfg_file = tmp_path / "my.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "method": "mhr",
                "n-splits": 2,
                "lr": 5e-3,
                "router_lr": 0.1,
                "batch_size": 2,
                "max_steps": 1,
                "eval": False,
                "adapter": {"n_skills": 3},
            }
        )
    )
    out = tmp_path / "run"
    assert (
        main(base_args(tiny_llama, superni, out) + ["--config", str(cfg_file), "--lr", "2e-3", "--batch-size", "3"])
        == 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # a flat adapter key and the `adapter:` section both set the method's options
    assert saved["method"] == "mhr" and (saved["n_splits"], saved["n_skills"]) == (2, 3) and saved["router_lr"] == 0.1
    assert saved["learning_rate"] == 2e-3 and saved["per_device_train_batch_size"] == 3  # the flags win
    assert saved["_resolved"]["adapter"]["n_skills"] == 3 and saved["_resolved"]["adapter"]["n_splits"] == 2
    assert not (out / "metrics.json").exists()  # eval: false in the file
    # the run's own config.yaml is a valid config file
    out2 = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(out2)]) == 0
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out2 / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same config, same seed: same weights


def test_report_over_two_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| lora") or line.startswith("| poly")]
    assert len(rows) == 2
    for run, row in zip(two_runs, rows):
        m = json.loads((run / "metrics.json").read_text())
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == m["method"]
        assert cells[2] == f"{m['trainable_parameters']:,}"
        assert cells[4] == f"{m['seen']['overall']['rougeL']:.2f}"
        assert cells[7] == f"{m['unseen']['overall']['rougeL']:.2f}"
    assert "## ROUGE-L per category" in text and "Keyword Tagging" in text


def test_eval_subcommand_rescores(two_runs, capsys):
    (two_runs[1] / "metrics.md").unlink()
    assert main(["eval", str(two_runs[1]), "--no-progress"]) == 0
    assert (two_runs[1] / "metrics.md").is_file()
    assert "| seen tasks (held-out instances) |" in capsys.readouterr().out


def test_analyze_calls_the_analysis_module(two_runs, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("orchmoe.recipe.analysis")

    def analyze_run(run_dir, out_dir=None, model=None, data=None):
        calls.append((str(run_dir), out_dir))
        return {"allocation_spread": 0.0012, "allocations_uniform": True, "files": {"a": 1, "b": 2, "c": 3}}

    fake.analyze_run = analyze_run
    monkeypatch.setitem(sys.modules, "orchmoe.recipe.analysis", fake)
    assert main(["analyze", str(two_runs[0]), "--out", "somewhere"]) == 0
    assert calls == [(str(two_runs[0]), "somewhere")]
    out = capsys.readouterr().out  # it says where it wrote and what it found
    assert "written to somewhere/" in out and "indistinguishable from uniform" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "moe"], f"unknown method 'moe'; choose one of {sorted(METHODS)} (did you mean 'mode'?)"),
        (["--data", "/no/such/superni"], "/no/such/superni"),
        (["--batch-size", "many"], "--batch-size: invalid int value: 'many'"),
        (["--method", "lora", "--n-skills", "4"], "--n-skills is not an option of this method (an option of"),
        (["--method", "lora", "--adapter.rnak", "4"], "unknown option '--adapter.rnak' (did you mean --adapter.rank"),
        (["--learning-rat", "0.1"], "(did you mean --learning-rate"),
        (["--target-modules", "((("], "target_modules '(((' is not a valid regular expression"),
        (["--lr", "nan"], "learning_rate must be a finite number"),
        (["--warmup-steps", "-3"], "warmup_steps must be >= 0"),
        (["--lr", "1", "--learning_rate", "2"], "--learning_rate and --lr set the same option"),
        (["--report_to", "tensorboard", "wandb"], "wandb is not installed"),
        (["--deepspeed", "ds.json"], "--deepspeed: not supported by orchmoe's recipe"),
        (["--eval_strategy", "steps"], "--eval_strategy: orchmoe's recipe evaluates by generation"),
        (["--optim", "sgd"], "--optim sgd: orchmoe's recipe trains with AdamW in the references' two-speed groups"),
    ],
)
def test_errors_are_one_clear_line(extra, message, tiny_llama, superni, tmp_path, capsys):
    try:
        assert main(base_args(tiny_llama, superni, tmp_path / "x") + extra) == 2
    except SystemExit as e:  # argparse's own errors (an unknown flag) exit 2 with a usage line
        assert e.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("orchmoe train: error:", "orchmoe: error:"))
    assert not (tmp_path / "x").exists()  # a failed run leaves no empty run folder behind


def test_a_failed_run_keeps_a_folder_it_did_not_make(tiny_llama, superni, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    assert main(base_args(tiny_llama, superni, out) + ["--tasks", "../elsewhere"]) == 2
    assert "not a plain name" in capsys.readouterr().err
    assert out.is_dir()  # the user's folder stays (marked as a run folder now, and empty otherwise)


def test_bad_config_file_names_the_key(tiny_llama, superni, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nlearning_rat: 0.1\n")
    assert main(base_args(tiny_llama, superni, tmp_path / "x") + ["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and str(bad) in err
    bad.write_text("warmup_ratio: lots\n")
    assert main(base_args(tiny_llama, superni, tmp_path / "x") + ["--config", str(bad)]) == 2
    assert "warmup_ratio" in capsys.readouterr().err
    assert main(base_args(tiny_llama, superni, tmp_path / "x") + ["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_report_and_eval_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "orchmoe eval" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "no adapter/" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    """(`python -m orchmoe` itself runs in test_train's SIGKILL test.)"""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    import dataclasses

    for group in (ModelArguments, DataArguments, EvalArguments):
        for f in dataclasses.fields(group):
            assert "--" + f.name in out, f.name
    for alias in (
        "--learning-rate",
        "--output-dir",
        "--per-device-train-batch-size",
        "--gradient-accumulation-steps",
        "--adapter.n_abstract_tasks",
        "--n-abstract-tasks",
        "--lr",
        "--out",
        "--batch-size",
        "--report_to",
    ):
        assert alias in out, alias
    assert "--config" in out and "--no-eval" in out and "--no-progress" in out
    # the chosen method's options only, in a group that names it; a default shown once, never "None"
    assert "orchmoe options (OrchMoEConfig)" in out and "--top-k" not in out and "--expert-rank" not in out
    assert "(default: None)" not in out and "(default: 4)" in out
    with pytest.raises(SystemExit):
        main(["train", "--method", "molora", "--help"])
    assert "--top-k" in capsys.readouterr().out
