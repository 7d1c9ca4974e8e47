"""Hostile and careless inputs (issue 12), table-driven: options, config files, adapter folders, data
files, numbers, and the eval/report/analyze commands. Each row is one bad input with the clear error
(a substring of the one line the CLI prints) or the behaviour it must get. The run-folder states
(kills, corruption, full disk, locks) are in test_hostile_runs.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from hostile_helpers import assert_clear_error, run_cli, train_args
from orchmoe import MoLoRAConfig, PolyConfig, get_model, load_adapter
from orchmoe.adapters.folder import AdapterMismatchError
from orchmoe.core.budget import BudgetError, lora_budget, match_budget
from orchmoe.core.routing import RoutingError
from orchmoe.data import DataError
from orchmoe.recipe.args import ArgumentsError, DataArguments, ModelArguments, OrchmoeTrainingArguments
from orchmoe.recipe.run_data import build_data
from recipe_helpers import SEEN, UNSEEN

# -- 1. command-line options: every bad value is one clear line before anything is loaded ----------------------
OPTIONS = [
    (["--lr", "nan"], "learning_rate must be a finite number"),
    (["--lr", "inf"], "learning_rate must be a finite number"),
    (["--lr", "1e400"], "learning_rate must be a finite number"),
    (["--lr", "-1"], "learning_rate must be > 0"),
    (["--lr", "0"], "learning_rate must be > 0"),
    (["--lr", "0x10"], "invalid float value: '0x10'"),
    (["--router-lr", "nan"], "router_lr must be a finite number"),
    (["--warmup-ratio", "1.5"], "warmup_steps must be a ratio in [0, 1) or a whole number of steps"),
    (["--warmup-steps", "-3"], "warmup_steps must be >= 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--task-seed", "-2"], "task_seed must be >= 0"),
    (["--batch-size", "0"], "per_device_train_batch_size must be >= 1"),
    (["--batch-size", "4.0"], "invalid int value: '4.0'"),
    (["--batch-size", "many"], "invalid int value: 'many'"),
    (["--grad-accum", "0"], "gradient_accumulation_steps must be >= 1"),
    (["--epochs", "-1"], "num_train_epochs must be >= 0"),
    (["--max-steps", "-2"], "--max-steps must be >= 0 (or -1: by epochs)"),
    (["--checkpoint-every", "-1"], "save_steps must be >= 0"),
    (["--keep-checkpoints", "0"], "save_total_limit must be >= 1"),
    (["--log-every", "0"], "logging_steps must be > 0"),
    (["--eval-batch-size", "0"], "per_device_eval_batch_size must be >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--max-source-len", "0"], "max_source_len must be >= 1"),
    (["--n-pos", "-1"], "n_pos must be >= 0"),
    (["--unseen-per-task", "0"], "unseen_per_task must be >= 1"),
    (["--train-per-task", "-1"], "train-per-task must be >= 0"),
    (["--tasks", "0"], "a number of tasks must be >= 1"),
    (["--tasks", "no_such_task"], "no task file in"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be >= 0"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["--budget-rank", "0"], "budget_rank must be >= 1"),
    (["--budget-rank", "8", "--budget-tolerance", "nan"], "budget_tolerance must be a finite number"),
    (["--budget-rank", "8", "--budget-tolerance", "2"], "budget_tolerance must be < 1"),
    (["--budget-rank", "8", "--budget-vary", "alpha"], "invalid choice: 'alpha' (choose from 'rank', 'n_skills')"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--schedule", "foo"], "foo is not a valid SchedulerType"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--report-to", "foo"], "unknown tracker 'foo'"),
    (["--report-to", "tensorboard", "wandb"], "wandb is not installed"),
    (["--method", "moe"], "(did you mean 'mode'?)"),
    (["--target-modules", "((("], "target_modules '(((' is not a valid regular expression"),
    (["--adapter.target-modules", "nomatch_xyz"], "matched no nn.Linear"),
    (["--adapter.task-temperature", "hot"], "invalid float value: 'hot'"),
    (["--adapter.rank", "0"], "rank must be a positive integer"),
    (["--adapter.rank", "2.5"], "invalid int value: '2.5'"),
    (["--adapter.rank", "nan"], "invalid int value: 'nan'"),
    (["--adapter.alpha", "inf"], "alpha must be a finite number"),
    (["--adapter.dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--adapter.n-skills", "-1"], "n_skills must be >= 1"),
    (["--adapter.n-tasks", "3"], "n_tasks is set from the data"),
    (["--method", "lora", "--n-skills", "4"], "--n-skills is not an option of this method (an option of"),
    (["--adapter.rnak", "4"], "(did you mean --adapter.rank"),
    (["--learning-rat", "0.1"], "(did you mean --learning-rate"),
    (["--lr", "1e-3", "--learning_rate", "2e-3"], "--learning_rate and --lr set the same option"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--data", "/no/such/superni"], "/no/such/superni"),
    (["--out", ""], "--out (output_dir) is empty"),
    (["--out", "  "], "--out (output_dir) is empty"),
    (["--out", "/"], "a run needs a folder of its own"),
    (["--eval", "--eval-per-task", "0", "--unseen-tasks", "0"], "nothing to evaluate"),
    (["--seed", str(2**32)], "seed must be < 2**32"),  # numpy's generators take 32 bits
]


@pytest.mark.parametrize("extra, message", OPTIONS, ids=[" ".join(a)[:40] for a, _ in OPTIONS])
def test_bad_option_is_one_clear_line(extra, message, tiny_llama, superni, tmp_path, capsys):
    rc, _, err = run_cli(train_args(tiny_llama, superni, tmp_path / "run", *extra), capsys)
    assert_clear_error(rc, err, message)
    assert not (tmp_path / "run" / "adapter").exists()  # refused before any training


# -- 2. config files --------------------------------------------------------------------------------------------
CONFIG_FILES = [
    ("key-twice", "method: lora\nmethod: poly\n", "'method' is given twice"),
    ("non-utf8", b"method: lora\nlr: \xff\xfe\n", "not UTF-8"),
    ("a-list", "- lr\n- seed\n", "the top level must be a mapping"),
    ("bad-yaml", "lr: [1, 2\n", "not valid YAML"),
    ("nan", "lr: .nan\n", "learning_rate must be a finite number"),
    ("list-value", "lr: [1, 2]\n", "lr takes one value, got a list [1, 2]"),
    ("dict-value", "lr: {a: 1}\n", "lr must be a single value or a list"),
    ("adapter-not-mapping", "adapter: 3\n", "must be a mapping"),
    ("adapter-unknown", "adapter: {rnak: 2}\n", "unknown option '--rnak'"),
    ("adapter-and-top", "rank: 2\nadapter: {rank: 4}\n", "'rank' is given twice (at the top and under 'adapter:')"),
    ("two-spellings", "lr: 1e-3\nlearning_rate: 2e-3\n", "set the same option (learning_rate)"),
    ("adapter-n-tasks", "adapter: {n_tasks: 3}\n", "n_tasks is set from the data"),
    ("empty-out", "out: ''\n", "--out (output_dir) is empty"),
    ("seed", "seed: -1\n", "seed must be >= 0"),
    ("tasks-null", "tasks: null\nwarmup_ratio: lots\n", "invalid float value: 'lots'"),
    ("bool-word", "resume: maybe\n", "Truthy value expected: got maybe"),
    ("unknown-key", "learning_rat: 0.1\n", "unknown option '--learning_rat'"),
    ("python-tag", "lr: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
    ("anchors", "a: &x [1, 2]\nb: *x\n", "anchors and aliases (&name, *name) are not allowed"),
    ("billion-laughs", "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c]\n", "anchors and aliases"),
    ("deep", "a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
    ("two-spellings-one-name", "learning-rate: 1e-3\nlearning_rate: 2e-3\n", "set the same option (learning_rate)"),
    ("list-as-a-key", "? [a, b]\n: 1\n", "a key must be an option name, got a list"),
    ("method-a-list", "method: [lora, poly]\n", "unknown method ['lora', 'poly']"),
]


@pytest.mark.parametrize("name, text, message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file_is_one_clear_line(name, text, message, tiny_llama, superni, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, _, err = run_cli(train_args(tiny_llama, superni, tmp_path / "run", "--config", str(cfg)), capsys)
    assert_clear_error(rc, err, message)
    assert str(cfg) in err  # the file is named
    assert not (tmp_path / "PWNED").exists()  # YAML loading is safe: no tag constructs Python objects


def test_config_file_that_is_a_folder_or_missing(tiny_llama, superni, tmp_path, capsys):
    for path, message in ((tmp_path, "is a folder, not a file"), (tmp_path / "none.yaml", "none.yaml' not found")):
        rc, _, err = run_cli(train_args(tiny_llama, superni, tmp_path / "run", "--config", str(path)), capsys)
        assert_clear_error(rc, err, message)


# -- 3. adapter folders: validated on load, the file and field named --------------------------------------------
def _cfg_edit(key_path, value):
    """An edit of adapter_config.json: set (or delete) the value at ``key_path`` ("*" = the first key)."""

    def edit(meta):
        d = meta
        for k in key_path[:-1]:
            d = d[next(iter(d)) if k == "*" else k]
        last = next(iter(d)) if key_path[-1] == "*" else key_path[-1]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return edit


_DELETE = object()
ADAPTER_CONFIGS = [
    ("not-json", b"{not json", "is not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", "is not valid UTF-8 text"),
    ("a-list", b"[]", "is not a JSON object"),
    ("deep", b"[" * 100000 + b"]" * 100000, "nests its JSON too deeply"),
    ("wrong-type", _cfg_edit(["peft_type"], "LORA"), "is not an orchmoe adapter (peft_type='LORA')"),
    ("record-string", _cfg_edit(["orchmoe"], "lora"), "'orchmoe' must be a mapping"),
    ("layers-null", _cfg_edit(["orchmoe", "layers"], None), "'orchmoe.layers' must be a mapping"),
    ("metadata-list", _cfg_edit(["orchmoe", "metadata"], [1]), "'orchmoe.metadata' must be a mapping"),
    ("layer-shape", _cfg_edit(["orchmoe", "layers", "*"], [32, "64"]), "must have a shape [in, out] of two positive"),
    ("rank-string", _cfg_edit(["rank"], "3"), "rank must be an integer, got '3'"),
    ("rank-null", _cfg_edit(["rank"], None), "rank must not be null"),
    ("alpha-missing", _cfg_edit(["alpha"], _DELETE), "the config has no 'alpha'"),
    ("alpha-nan", _cfg_edit(["alpha"], float("nan")), "alpha must be a finite number"),
    ("method-unknown", _cfg_edit(["peft_type"], "ORCHMOE_MOE"), "invalid adapter config: unknown method 'moe'"),
    ("newer-major", _cfg_edit(["orchmoe", "orchmoe_version"], "99.0.0"), "a newer major version"),
    ("other-model", _cfg_edit(["orchmoe", "base_model", "hidden_size"], 4096), "was saved for another model"),
    ("no-config-file", lambda meta: None, "no adapter_config.json in"),
]


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, superni, tmp_path_factory) -> Path:
    """A finished, evaluated 2-step OrchMoE run (its adapter and folder are copied and spoiled below)."""
    from orchmoe.cli import main

    out = tmp_path_factory.mktemp("hostile") / "run"
    args = train_args(tiny_llama, superni, out, "--max-steps", "2", "--eval", "--checkpoint-every", "0")
    assert main(args) == 0
    return out


def _spoil_config(adapter: Path, how) -> None:
    p = adapter / "adapter_config.json"
    if isinstance(how, bytes):
        p.write_bytes(how)
        return
    meta = json.loads(p.read_text())
    how(meta)
    p.write_text(json.dumps(meta))


def _base(tiny_llama):
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_llama))[0]


@pytest.mark.parametrize("name, how, message", ADAPTER_CONFIGS, ids=[c[0] for c in ADAPTER_CONFIGS])
def test_bad_adapter_config_is_refused(name, how, message, adapter_run, tiny_llama, tmp_path):
    adapter = shutil.copytree(adapter_run / "adapter", tmp_path / "adapter")
    _spoil_config(adapter, how)
    if name == "no-config-file":
        (adapter / "adapter_config.json").unlink()
    with pytest.raises((AdapterMismatchError, FileNotFoundError)) as info:
        load_adapter(_base(tiny_llama), adapter)
    assert message in str(info.value)
    assert str(adapter) in str(info.value)  # the folder (and, where it is the config's fault, the file) is named


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _nan_tensor(p: Path) -> None:
    """An adapter trained into NaN (or bytes corrupted into NaN)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(p))
    k = next(k for k in t if k.endswith("lora_A"))
    t[k][0, 0] = float("nan")
    save_file(t, str(p))


def _flip_bit(p: Path) -> None:
    """One flipped bit in the first tensor value's lowest mantissa byte: still a finite number."""
    data = bytearray(p.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len] ^= 1
    p.write_bytes(bytes(data))


def _bad_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    p.write_bytes(bytes(data))


ADAPTER_WEIGHTS = [
    ("truncated", _truncate, "is not a readable safetensors file (truncated or corrupted?)"),
    ("nan", _nan_tensor, "holds NaN or infinite values"),
    ("bit-flip", _flip_bit, "does not match the checksum in its adapter_config.json"),
    ("header", _bad_header, "is not a readable safetensors file"),
    ("empty", lambda p: p.write_bytes(b""), "is not a readable safetensors file"),
    ("missing", lambda p: p.unlink(), "no adapter weights at"),
]


@pytest.mark.parametrize("name, spoil, message", ADAPTER_WEIGHTS, ids=[c[0] for c in ADAPTER_WEIGHTS])
def test_bad_adapter_weights_are_refused(name, spoil, message, adapter_run, tiny_llama, tmp_path):
    adapter = shutil.copytree(adapter_run / "adapter", tmp_path / "adapter")
    spoil(adapter / "adapter_model.safetensors")
    with pytest.raises((AdapterMismatchError, FileNotFoundError), match="adapter_model.safetensors") as info:
        load_adapter(_base(tiny_llama), adapter)
    assert message in str(info.value)


def test_weights_changed_on_purpose_load_once_the_checksum_is_removed(adapter_run, tiny_llama, tmp_path):
    """The error names the way out: without 'weights_sha256' (as in adapters from before it) the file loads."""
    adapter = shutil.copytree(adapter_run / "adapter", tmp_path / "adapter")
    _flip_bit(adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="delete 'weights_sha256'"):
        load_adapter(_base(tiny_llama), adapter)
    _spoil_config(adapter, _cfg_edit(["orchmoe", "weights_sha256"], _DELETE))
    assert load_adapter(_base(tiny_llama), adapter) is not None


def test_newer_minor_version_loads_with_a_warning(adapter_run, tiny_llama, tmp_path):
    adapter = shutil.copytree(adapter_run / "adapter", tmp_path / "adapter")
    _spoil_config(adapter, _cfg_edit(["orchmoe", "orchmoe_version"], "0.99.0"))
    with pytest.warns(UserWarning, match="newer than this orchmoe"):
        load_adapter(_base(tiny_llama), adapter)


# -- 4. eval, report, analyze on bad run folders (through the CLI) ----------------------------------------------
def _run_copy(adapter_run: Path, tmp_path: Path, spoil) -> Path:
    run = shutil.copytree(adapter_run, tmp_path / "run")
    spoil(run)
    return run


COMMANDS = [
    ("eval-missing", ["eval", "{tmp}/nope"], None, "does not exist"),
    ("eval-no-adapter", ["eval", "{run}"], lambda r: shutil.rmtree(r / "adapter"), "has no adapter/ folder"),
    (
        "eval-garbage-config",
        ["eval", "{run}"],
        lambda r: (r / "config.yaml").write_bytes(b"\x00\xff garbage: [\n"),
        "not UTF-8 text",
    ),
    (
        "eval-empty-config",
        ["eval", "{run}"],
        lambda r: (r / "config.yaml").write_text(""),
        "does not hold a run configuration",
    ),
    (
        "eval-truncated-adapter",
        ["eval", "{run}"],
        lambda r: _truncate(r / "adapter" / "adapter_model.safetensors"),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "eval-nothing-to-score",
        ["eval", "{run}", "--unseen-tasks", "0"],
        lambda r: _set_yaml(r, eval_per_task=0),
        "nothing to evaluate",
    ),
    ("report-truncated-metrics", ["report", "{run}"], lambda r: _truncate(r / "metrics.json"), "is not valid JSON"),
    ("report-no-metrics", ["report", "{run}"], lambda r: (r / "metrics.json").unlink(), "orchmoe eval"),
    ("report-out-is-folder", ["report", "{run}", "--out", "{tmp}"], lambda r: None, "is a directory; name a file"),
    ("analyze-missing", ["analyze", "{tmp}/nope"], None, "does not exist"),
    (
        "eval-fifo",
        ["eval", "{tmp}/fifo"],
        lambda r: os.mkfifo(r.parent / "fifo"),
        "is a FIFO (named pipe), not a folder",
    ),
    ("report-fifo", ["report", "{tmp}/fifo"], lambda r: os.mkfifo(r.parent / "fifo"), "is a FIFO (named pipe), not a"),
    ("analyze-fifo", ["analyze", "{tmp}/fifo"], lambda r: os.mkfifo(r.parent / "fifo"), "is a FIFO (named pipe), not"),
    (
        "analyze-out-holds-user-files",
        ["analyze", "{run}", "--out", "{run}"],
        lambda r: None,
        "holds files an analysis did not write",
    ),
    (
        "analyze-out-is-file",
        ["analyze", "{run}", "--out", "{run}/config.yaml"],
        lambda r: None,
        "config.yaml is a regular file; name a new or empty folder",
    ),
    (
        "report-metrics-a-list",
        ["report", "{run}"],
        lambda r: (r / "metrics.json").write_text("[]"),
        "metrics.json holds a list, not the metrics of an evaluation",
    ),
    (
        "report-metrics-part-a-number",
        ["report", "{run}"],
        lambda r: (r / "metrics.json").write_text(json.dumps({"seen": 3})),
        "metrics.json: 'seen' is not a mapping",
    ),
    (
        "report-out-is-the-runs-metrics",
        ["report", "{run}", "--out", "{run}/metrics.json"],
        lambda r: None,
        "metrics.json exists and is not an earlier report",
    ),
    (
        "analyze-garbage-config",
        ["analyze", "{run}"],
        lambda r: (r / "config.yaml").write_text("- 1\n"),
        "the top level must be a mapping",
    ),
]


def _set_yaml(run: Path, **changes) -> None:
    import yaml

    d = yaml.safe_load((run / "config.yaml").read_text())
    d.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(d))


@pytest.mark.parametrize("name, args, spoil, message", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_bad_run_folder_commands(name, args, spoil, message, adapter_run, tmp_path, capsys):
    run = _run_copy(adapter_run, tmp_path, spoil) if spoil else tmp_path / "nope"
    argv = [a.format(run=run, tmp=tmp_path) for a in args] + (["--no-progress"] if args[0] == "eval" else [])
    rc, _, err = run_cli(argv, capsys)
    assert_clear_error(rc, err, message)


def test_report_out_replaces_an_earlier_report_never_another_file(adapter_run, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    rc, _, err = run_cli(["report", str(adapter_run), "--out", str(notes)], capsys)
    assert_clear_error(rc, err, "notes.md exists and is not an earlier report")
    assert notes.read_text() == "# my notes\n"
    report = tmp_path / "report.md"
    for _ in range(2):  # written, then an earlier report replaced
        rc, _, err = run_cli(["report", str(adapter_run), "--out", str(report)], capsys)
        assert rc == 0, err
    assert report.read_text().startswith("## Runs\n")


def test_data_that_is_a_fifo_is_named_not_read(tiny_llama, superni, tmp_path, capsys):
    os.mkfifo(tmp_path / "rows.jsonl")
    rc, _, err = run_cli(
        train_args(tiny_llama, superni, tmp_path / "run", "--data", str(tmp_path / "rows.jsonl")), capsys
    )
    assert_clear_error(rc, err, "rows.jsonl' is a FIFO (named pipe), not a data folder or file")


# -- 5. data files ------------------------------------------------------------------------------------------------
TASK = SEEN[0]


def _edit_task(fn):
    def edit(root: Path) -> None:
        p = root / "tasks" / f"{TASK}.json"
        t = json.loads(p.read_text())
        fn(t)
        p.write_text(json.dumps(t))

    return edit


def _dup_ids(t, same_input: bool) -> None:
    a, b = t["Instances"][0], t["Instances"][1]
    b["id"] = a["id"]
    if same_input:
        b["input"] = a["input"]


DATA = [
    ("null-input", _edit_task(lambda t: t["Instances"][3].update(input=None)), "has a null 'input'"),
    ("null-output", _edit_task(lambda t: t["Instances"][3].update(output=None)), "must be a string or a list"),
    ("null-demo-input", _edit_task(lambda t: t["Positive Examples"][0].update(input=None)), "has a null 'input'"),
    ("dup-id-other-input", _edit_task(lambda t: _dup_ids(t, False)), "repeats id"),
    ("empty-instances", _edit_task(lambda t: t.update(Instances=[])), "'Instances' is empty"),
    ("definition-number", _edit_task(lambda t: t.update(Definition=3)), "'Definition' must be a string"),
    ("bad-json", lambda r: (r / "tasks" / f"{TASK}.json").write_text('{"Definition": '), "malformed JSON at line"),
    ("non-utf8-task", lambda r: (r / "tasks" / f"{TASK}.json").write_bytes(b"\xff\xfe{}"), "not valid UTF-8"),
    (
        "non-utf8-split",
        lambda r: (r / "splits" / "default" / "test_tasks.txt").write_bytes(b"task\xff\n"),
        "test_tasks.txt: not UTF-8 text",
    ),
]


@pytest.mark.parametrize("name, spoil, message", DATA, ids=[c[0] for c in DATA])
def test_bad_data_is_a_clear_error(name, spoil, message, superni, tmp_path):
    root = shutil.copytree(superni, tmp_path / "ni")
    spoil(root)
    cfg = DataArguments(data=str(root), tasks=",".join(SEEN), train_per_task="12", eval_per_task=3, unseen_tasks="all")
    with pytest.raises(DataError) as info:
        build_data(cfg, 0)
    assert message in str(info.value) and str(root) in str(info.value)


def test_repeated_instance_is_one_instance_never_in_both_splits(superni, tmp_path):
    root = shutil.copytree(superni, tmp_path / "ni")
    _edit_task(lambda t: _dup_ids(t, True))(root)
    n = len(json.loads((superni / "tasks" / f"{TASK}.json").read_text())["Instances"])
    data = build_data(
        DataArguments(data=str(root), tasks=TASK, train_per_task="all", eval_per_task=10, unseen_tasks="0"), 0
    )
    train_ids, eval_ids = [e.id for e in data.train], [e.id for e in data.eval]
    assert len(train_ids) + len(eval_ids) == n - 1 and not set(train_ids) & set(eval_ids)


def test_split_naming_a_missing_test_task_warns(superni, tmp_path, caplog):
    root = shutil.copytree(superni, tmp_path / "ni")
    with open(root / "splits" / "default" / "test_tasks.txt", "a") as fh:
        fh.write("\ntask9999_not_here\n")
    with caplog.at_level(logging.WARNING):
        data = build_data(DataArguments(data=str(root), tasks=",".join(SEEN), train_per_task="4", eval_per_task=2), 0)
    assert "task9999_not_here" in caplog.text and "not scored" in caplog.text
    assert UNSEEN in data.unseen_tasks


# -- 6. numbers in the Python API -----------------------------------------------------------------------------
BUDGETS = [
    ("nan-budget", dict(budget=float("nan")), "budget must be a positive number"),
    ("inf-budget", dict(budget=float("inf")), "budget must be a positive number"),
    ("zero-budget", dict(budget=0), "budget must be a positive number"),
    ("negative-budget", dict(budget=-5), "budget must be a positive number"),
    ("bool-budget", dict(budget=True), "budget must be a positive number"),
    ("nan-tolerance", dict(tolerance=float("nan")), "tolerance must be a relative tolerance in (0, 1)"),
    ("zero-tolerance", dict(tolerance=0.0), "tolerance must be a relative tolerance"),
    ("huge-tolerance", dict(tolerance=300.0), "tolerance must be a relative tolerance"),
    ("vary-alpha", dict(vary="alpha"), "varying 'alpha' does not change the trainable parameter count"),
    ("vary-dropout", dict(vary="dropout"), "varying 'dropout' does not change"),
    ("vary-target-modules", dict(vary="target_modules"), "varying 'target_modules' does not change"),
    ("vary-unknown", dict(vary="experts"), "no field 'experts'"),
    ("max-value", dict(max_value=0), "max_value must be a positive integer"),
]


@pytest.mark.parametrize("name, kwargs, message", BUDGETS, ids=[b[0] for b in BUDGETS])
def test_match_budget_rejects_bad_numbers(name, kwargs, message):
    from core_helpers import tiny_base

    base = tiny_base("llama")
    kwargs = {"budget": lora_budget(base, 8), **kwargs}
    with pytest.raises(BudgetError) as info:
        match_budget(MoLoRAConfig(n_skills=2), base, kwargs.pop("budget"), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("ids", [[0.0, 1.0], [0.5, 1.7], [True, False]], ids=["float", "fraction", "bool"])
def test_task_ids_must_be_integers(ids):
    from core_helpers import tiny_base

    model = get_model(tiny_base("llama"), PolyConfig(n_tasks=3, n_skills=2, rank=2))
    with pytest.raises(RoutingError, match="task_ids must be integers"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), task_ids=ids)


def test_options_from_python_reject_bad_numbers(tmp_path):
    """The option dataclasses check their values where they are defined, also when built in Python."""
    out = str(tmp_path / "run")
    for build, message in (
        (lambda: OrchmoeTrainingArguments(output_dir=out, learning_rate=math.nan), "finite"),
        (lambda: OrchmoeTrainingArguments(output_dir=out, seed=-1), ">= 0"),
        (lambda: OrchmoeTrainingArguments(output_dir=out, warmup_steps=-3), ">= 0"),
        (lambda: OrchmoeTrainingArguments(output_dir=""), "is empty"),
        (lambda: ModelArguments(budget_tolerance=math.inf), "finite"),
        (lambda: DataArguments(n_pos=-1), ">= 0"),
    ):
        with pytest.raises(ArgumentsError, match=message):
            build()
