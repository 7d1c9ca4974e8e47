"""The in-process cases of `hostile_probe.py`: CLI options and config files, data formats, adapter folders, the
Python API, predict and export, report and eval. Each returns (class, detail); see hostile_probe.py."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from hostile_probe import Ctx, case, clear_cli, clear_raise, cli, judge_exception, train_argv, tree_bytes

TASK = "task1426_country_independence_year"
UNSEEN = "task645_summarization"


# -- helpers -------------------------------------------------------------------------------------------------
def _write(p: Path, content) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _config_case(ctx: Ctx, content, *needles: str, name: str = "cfg.yaml"):
    cfg = _write(ctx.tmp / name, content)
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--config", cfg)), name, *needles)


def _base(ctx: Ctx):
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    return load_model_and_tokenizer(str(ctx.model))[0]


def _tok(ctx: Ctx):
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    return load_model_and_tokenizer(str(ctx.model))[1]


def _adapter_copy(ctx: Ctx, src: Path | None = None) -> Path:
    return Path(shutil.copytree(src or ctx.adapter, ctx.tmp / "adapter"))


def _edit_json(p: Path, fn) -> None:
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


def _loaded(ctx: Ctx, run: Path | None = None):
    from orchmoe import load_adapter

    return load_adapter(_base(ctx), (run or ctx.run) / "adapter")


def _data_copy(ctx: Ctx) -> Path:
    return Path(shutil.copytree(ctx.data, ctx.tmp / "ni"))


def _edit_task(root: Path, fn, task: str = TASK) -> None:
    _edit_json(root / "tasks" / f"{task}.json", fn)


def _build(root, **kw):
    from orchmoe.recipe.args import DataArguments
    from orchmoe.recipe.run_data import build_data

    args = dict(data=str(root), tasks=TASK, train_per_task="4", eval_per_task=2, unseen_tasks="0")
    return build_data(DataArguments(**{**args, **kw}), 0)


def _data_error(root, *needles, **kw):
    return clear_raise(lambda: _build(root, **kw), *needles)


def _rows_file(p: Path, rows: list[dict]) -> Path:
    return _write(p, "".join(json.dumps(r) + "\n" for r in rows))


def _ni_rows(task="t_a", n=8, **extra):
    return [
        {"task_name": task, "id": f"{task}-{i}", "definition": "Repeat.", "inputs": f"word {i}", "targets": f"w{i}"}
        | extra
        for i in range(n)
    ]


# == 1. command line and config files =========================================================================
@case("config", "json-duplicate-key")
def _(ctx):
    return _config_case(ctx, '{"lr": 0.001, "lr": 0.002}', "twice", name="cfg.json")


@case("config", "one-key-two-spellings-in-a-file")
def _(ctx):
    return _config_case(ctx, "learning-rate: 0.001\nlearning_rate: 0.002\n", "learning")


@case("config", "unhashable-yaml-key")
def _(ctx):
    return _config_case(ctx, "? [a, b]\n: 1\n")


@case("config", "two-yaml-documents")
def _(ctx):
    return _config_case(ctx, "lr: 0.01\n---\nlr: 0.02\n")


@case("config", "two-megabytes-of-comments")
def _(ctx):
    return _config_case(ctx, "# padding\n" * 210_000 + "lr: 0.01\n", "bytes")


@case("config", "control-characters")
def _(ctx):
    return _config_case(ctx, "lr: 0.01\nseed: \x00\x07\n")


@case("config", "config-is-a-fifo", timeout=30)
def _(ctx):
    os.mkfifo(ctx.tmp / "cfg.yaml")
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--config", ctx.tmp / "cfg.yaml")), "FIFO")


@case("config", "config-is-dev-zero", timeout=30)
def _(ctx):
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--config", "/dev/zero")), "/dev/zero")


@case("config", "adapter-section-misspelled-key")
def _(ctx):
    return _config_case(ctx, "adapter:\n  rank: 2\n  n_skils: 3\n", "n_skils")


@case("config", "adapter-section-nested-twice")
def _(ctx):
    return _config_case(ctx, "adapter:\n  adapter:\n    rank: 2\n", "adapter")


@case("config", "date-for-a-number")
def _(ctx):
    return _config_case(ctx, "lr: 2024-01-01\n", "2024-01-01")


@case("config", "method-as-a-list")
def _(ctx):
    return _config_case(ctx, "method: [lora, poly]\n", "method")


@case("config", "empty-key")
def _(ctx):
    return _config_case(ctx, "'': 1\n")


@case("config", "integer-key")
def _(ctx):
    return _config_case(ctx, "1: 2\n", "1")


@case("cli", "seed-beyond-32-bits")
def _(ctx):
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--seed", str(2**32))), "seed")


@case("cli", "adam-epsilon-zero")
def _(ctx):
    """eps 0 turns Adam's update of a parameter with a zero gradient into 0/0: refused, or trains to a finite adapter."""
    res = cli(*train_argv(ctx, ctx.tmp / "run", "--adam-epsilon", "0", steps=3))
    if res.rc == 0:
        from safetensors.torch import load_file

        t = load_file(str(ctx.tmp / "run" / "adapter" / "adapter_model.safetensors"))
        finite = all(bool(v.isfinite().all()) for v in t.values() if v.is_floating_point())
        return ("SENSIBLE", "trained, finite adapter") if finite else ("SILENT", "exit 0 with a NaN adapter")
    return clear_cli(res, "eps")


@case("cli", "data-is-a-fifo", timeout=30)
def _(ctx):
    os.mkfifo(ctx.tmp / "data.jsonl")
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--data", ctx.tmp / "data.jsonl")), "FIFO")


@case("cli", "model-is-a-file")
def _(ctx):
    _write(ctx.tmp / "model.bin", b"\x00" * 64)
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--model", ctx.tmp / "model.bin")), "model.bin")


@case("cli", "out-below-a-device")
def _(ctx):
    return clear_cli(cli(*train_argv(ctx, "/dev/null/run")), "/dev/null")


@case("cli", "rank-and-adapter-rank")
def _(ctx):
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--rank", "2", "--adapter.rank", "4")), "rank")


@case("cli", "more-eval-instances-than-a-task-has")
def _(ctx):
    return clear_cli(cli(*train_argv(ctx, ctx.tmp / "run", "--eval-per-task", "100000")), "instances")


# == 2. run folders: eval, report, resume ======================================================================
def _run_copy(ctx: Ctx, run: Path | None = None) -> Path:
    return Path(shutil.copytree(run or ctx.run, ctx.tmp / "run", symlinks=True))


@case("report", "metrics-is-a-list")
def _(ctx):
    run = _run_copy(ctx)
    (run / "metrics.json").write_text("[]")
    return clear_cli(cli("report", run), "metrics.json")


@case("report", "metrics-part-is-a-number")
def _(ctx):
    run = _run_copy(ctx)
    _edit_json(run / "metrics.json", lambda m: m.update(seen=3))
    return clear_cli(cli("report", run), "metrics.json")


@case("report", "out-is-the-runs-own-metrics")
def _(ctx):
    run = _run_copy(ctx)
    before = (run / "metrics.json").read_bytes()
    res = cli("report", run, "--out", run / "metrics.json")
    if (run / "metrics.json").read_bytes() != before:
        return "LOST", "the run's metrics.json was replaced by the report"
    return clear_cli(res, "metrics.json")


@case("report", "out-is-a-users-notes-file")
def _(ctx):
    run = _run_copy(ctx)
    notes = _write(ctx.tmp / "notes.md", "# my notes, written by hand\n")
    res = cli("report", run, "--out", notes)
    if notes.read_text() != "# my notes, written by hand\n":
        return "LOST", "the user's notes.md was replaced by the report"
    return clear_cli(res, "notes.md")


@case("report", "out-is-an-earlier-report")
def _(ctx):
    run = _run_copy(ctx)
    out = ctx.tmp / "report.md"
    first, second = cli("report", run, "--out", out), cli("report", run, "--out", out)
    ok = first.rc == 0 and second.rc == 0 and out.read_text().startswith("## Runs")
    return ("SENSIBLE", "an earlier report is replaced") if ok else ("TRACEBACK", second.last[:150])


@case("eval", "metrics-json-is-a-link-out")
def _(ctx):
    run = _run_copy(ctx)
    victim = _write(ctx.tmp / "victim.txt", "precious\n")
    (run / "metrics.json").unlink()
    (run / "metrics.json").symlink_to(victim)
    res = cli("eval", run, "--no-progress")
    if victim.read_text() != "precious\n":
        return "LOST", "eval wrote through the link into the file it points to"
    return clear_cli(res, "metrics.json")


@case("eval", "name-climbing-out")
def _(ctx):
    run = _run_copy(ctx)
    before = sorted(p.name for p in ctx.tmp.iterdir())
    res = cli("eval", run, "--data", ctx.data, "--tasks", UNSEEN, "--name", "../../../escape", "--no-progress")
    outside = sorted(set(p.name for p in ctx.tmp.iterdir()) - set(before))
    if outside or (ctx.tmp.parent / "escape").exists():
        return "LOST", f"wrote outside the run folder: {outside}"
    return ("SENSIBLE", "kept inside the run folder") if res.rc == 0 else clear_cli(res, "name")


def _killed_run(ctx: Ctx) -> Path:
    """The fixture run as if killed before its final save: its checkpoints only."""
    run = _run_copy(ctx)
    for name in ("train_summary.json", "metrics.json", "metrics.md", "predictions.jsonl"):
        (run / name).unlink()
    shutil.rmtree(run / "adapter")
    return run


@case("resume", "manifest-lists-an-absolute-path")
def _(ctx):
    """A received run folder whose checkpoint manifest names a file outside it: --overwrite deletes only its own."""
    run = _killed_run(ctx)
    victim = _write(ctx.tmp / "victim.txt", "precious\n")
    _edit_json(run / "checkpoint-2" / "manifest.json", lambda m: m["files"].update({str(victim): {"size": 9}}))
    res = cli(*train_argv(ctx, run, "--overwrite", "--method", "orchmoe", checkpoint_every=1, evaluate=True))
    if not victim.exists():
        return "LOST", "--overwrite deleted a file outside the run folder that a manifest named"
    return ("SENSIBLE", "trained; the outside file kept") if res.rc == 0 else clear_cli(res, "manifest")


@case("resume", "manifest-lists-a-path-outside-resume")
def _(ctx):
    """The same on a plain resume: the damaged newest checkpoint is set aside, nothing outside is read or deleted."""
    run = _killed_run(ctx)
    victim = _write(ctx.tmp / "victim.txt", "precious\n")
    (run / "checkpoint-2" / "manifest.json").unlink()  # never completed: removed on resume
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"PK")
    (run / "checkpoint-2" / "manifest.json").write_text(json.dumps({"files": {"../../victim.txt": {"size": 1}}}))
    res = cli(*train_argv(ctx, run, "--method", "orchmoe", checkpoint_every=1, evaluate=True))
    if not victim.exists():
        return "LOST", "a resume deleted a file outside the run folder"
    return ("SENSIBLE", "resumed; the outside file kept") if res.rc == 0 else clear_cli(res)


@case("resume", "checkpoint-is-a-link-to-a-users-folder")
def _(ctx):
    run = _killed_run(ctx)
    mine = Path(shutil.copytree(run / "checkpoint-2", ctx.tmp / "mine"))
    _write(mine / "notes.txt", "mine\n")
    before = tree_bytes(mine)
    shutil.rmtree(run / "checkpoint-2")
    (run / "checkpoint-2").symlink_to(mine, target_is_directory=True)
    res = cli(*train_argv(ctx, run, "--overwrite", "--method", "orchmoe", checkpoint_every=1, evaluate=True))
    if tree_bytes(mine) != before:
        return "LOST", "files in the folder a checkpoint link points to were deleted or changed"
    return ("SENSIBLE", "the linked folder kept") if res.rc == 0 else clear_cli(res, "checkpoint-2")


@case("resume", "train-log-is-a-link-out")
def _(ctx):
    run = _killed_run(ctx)
    victim = _write(ctx.tmp / "victim.txt", "precious\n")
    (run / "train_log.jsonl").unlink()
    (run / "train_log.jsonl").symlink_to(victim)
    res = cli(*train_argv(ctx, run, "--method", "orchmoe", checkpoint_every=1, evaluate=True))
    if victim.read_text() != "precious\n":
        return "LOST", "the resumed run wrote its log into the file train_log.jsonl links to"
    return ("SENSIBLE", "the linked file kept") if res.rc == 0 else clear_cli(res, "train_log.jsonl")


# == 3. data ==================================================================================================
@case("data", "superni-nan-input")
def _(ctx):
    root = _data_copy(ctx)
    text = (root / "tasks" / f"{TASK}.json").read_text()
    t = json.loads(text)
    t["Instances"][0]["input"] = math.nan
    (root / "tasks" / f"{TASK}.json").write_text(json.dumps(t))  # json writes NaN, and reads it back
    return _data_error(root, TASK, "input")


@case("data", "superni-infinite-output")
def _(ctx):
    root = _data_copy(ctx)
    _edit_task(root, lambda t: t["Instances"][0].update(output=[math.inf]))
    return _data_error(root, TASK, "output")


@case("data", "superni-task-file-is-a-fifo", timeout=30)
def _(ctx):
    root = _data_copy(ctx)
    (root / "tasks" / f"{TASK}.json").unlink()
    os.mkfifo(root / "tasks" / f"{TASK}.json")
    return _data_error(root, "FIFO")


@case("data", "superni-task-file-is-a-folder")
def _(ctx):
    root = _data_copy(ctx)
    (root / "tasks" / f"{TASK}.json").unlink()
    (root / "tasks" / f"{TASK}.json").mkdir()
    return _data_error(root, "folder")


@case("data", "superni-split-file-is-a-fifo", timeout=30)
def _(ctx):
    root = _data_copy(ctx)
    split = root / "splits" / "default" / "test_tasks.txt"
    split.unlink()
    os.mkfifo(split)
    return _data_error(root, "FIFO", unseen_tasks="all")


@case("data", "superni-split-crlf-tabs-and-repeats")
def _(ctx):
    root = _data_copy(ctx)
    split = root / "splits" / "default" / "test_tasks.txt"
    names = split.read_text().split()
    split.write_bytes(("\r\n".join(f"\t{n}  " for n in names + names) + "\r\n").encode())
    data = _build(root, unseen_tasks="all")
    ok = sorted(data.unseen_tasks) == sorted(n for n in names if (root / "tasks" / f"{n}.json").is_file())
    return ("SENSIBLE", f"{len(data.unseen_tasks)} unseen tasks") if ok else ("SILENT", f"{data.unseen_tasks}")


@case("data", "superni-split-in-utf16")
def _(ctx):
    root = _data_copy(ctx)
    split = root / "splits" / "default" / "test_tasks.txt"
    split.write_bytes(split.read_text().encode("utf-16"))
    return _data_error(root, "test_tasks.txt", unseen_tasks="all")


@case("data", "superni-one-megabyte-inputs", timeout=120)
def _(ctx):
    root = _data_copy(ctx)
    _edit_task(root, lambda t: [i.update(input="word " * 200_000) for i in t["Instances"][:12]])
    res = cli(*train_argv(ctx, ctx.tmp / "run", "--tasks", TASK, "--unseen-tasks", "0", "--data", root, steps=1))
    return ("SENSIBLE", "trained on the cut prompts") if res.rc == 0 else clear_cli(res)


@case("data", "superni-definition-holds-a-number")
def _(ctx):
    root = _data_copy(ctx)
    _edit_task(root, lambda t: t.update(Definition=["Say the year.", 3]))
    return _data_error(root, "Definition")


@case("data", "superni-categories-is-a-number")
def _(ctx):
    root = _data_copy(ctx)
    _edit_task(root, lambda t: t.update(Categories=5))
    return _data_error(root, "Categories")


@case("data", "superni-positive-examples-is-an-object")
def _(ctx):
    root = _data_copy(ctx)
    _edit_task(root, lambda t: t.update({"Positive Examples": {"input": "a", "output": "b"}}))
    return _data_error(root, "Positive Examples")


@case("tables", "jsonl-nan-input")
def _(ctx):
    rows = _ni_rows()
    f = _write(ctx.tmp / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows).replace('"word 3"', "NaN"))
    return _data_error(f, "d.jsonl", tasks="t_a")


@case("tables", "parquet-float-inputs-with-nan")
def _(ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _ni_rows()
    for i, r in enumerate(rows):
        r["inputs"] = math.nan if i == 2 else float(i)
    pq.write_table(pa.Table.from_pylist(rows), ctx.tmp / "d.parquet")
    return _data_error(ctx.tmp / "d.parquet", "d.parquet", tasks="t_a")


@case("tables", "jsonl-with-a-bom")
def _(ctx):
    f = _rows_file(ctx.tmp / "d.jsonl", _ni_rows())
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    try:
        data = _build(f, tasks="t_a")
    except Exception as e:  # noqa: BLE001
        return judge_exception(e, "d.jsonl", "BOM")
    return ("SENSIBLE", f"{len(data.train)} training rows") if len(data.train) == 4 else ("SILENT", "rows lost")


@case("tables", "jsonl-mixed-int-and-text-inputs")
def _(ctx):
    rows = _ni_rows()
    rows[0]["inputs"] = 1942
    f = _rows_file(ctx.tmp / "d.jsonl", rows)
    try:
        data = _build(f, tasks="t_a", train_per_task="all")
    except Exception as e:  # noqa: BLE001
        return judge_exception(e, "d.jsonl")
    texts = {x.input for x in data.train + data.eval}
    return ("SENSIBLE", "1942 read as text") if "1942" in texts else ("SILENT", f"inputs {sorted(texts)[:3]}")


@case("tables", "jsonl-empty-task-name")
def _(ctx):
    f = _rows_file(ctx.tmp / "d.jsonl", _ni_rows(task="") + _ni_rows(task="t_b"))
    return _data_error(f, "task", tasks="all")


@case("tables", "jsonl-blank-task-name")
def _(ctx):
    f = _rows_file(ctx.tmp / "d.jsonl", _ni_rows(task="  ") + _ni_rows(task="t_b"))
    return _data_error(f, "task", tasks="all")


@case("tables", "table-path-is-a-fifo", timeout=30)
def _(ctx):
    os.mkfifo(ctx.tmp / "d.jsonl")
    return _data_error(ctx.tmp / "d.jsonl", "FIFO", tasks="all")


@case("tables", "folder-with-a-fifo-beside-the-data", timeout=30)
def _(ctx):
    _rows_file(ctx.tmp / "data" / "a.jsonl", _ni_rows())
    os.mkfifo(ctx.tmp / "data" / "b.jsonl")
    data = _build(ctx.tmp / "data", tasks="t_a")
    return ("SENSIBLE", "the FIFO skipped") if len(data.train) == 4 else ("SILENT", "rows lost")


@case("tables", "corrupt-parquet")
def _(ctx):
    _write(ctx.tmp / "d.parquet", b"PAR1" + os.urandom(300) + b"PAR1")
    return _data_error(ctx.tmp / "d.parquet", "d.parquet", tasks="all")


@case("tables", "json-of-columns")
def _(ctx):
    rows = _ni_rows()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    f = _write(ctx.tmp / "d.json", json.dumps(cols))
    try:
        data = _build(f, tasks="t_a")
    except Exception as e:  # noqa: BLE001
        return judge_exception(e, "d.json")
    return ("SENSIBLE", "read as columns") if len(data.train) == 4 else ("SILENT", f"{len(data.train)} rows")


# == 4. adapter folders =========================================================================================
def _load_error(ctx: Ctx, folder: Path, *needles: str):
    from orchmoe import load_adapter

    return clear_raise(lambda: load_adapter(_base(ctx), folder), *needles)


@case("adapter", "poly-config-beside-orchmoe-weights")
def _(ctx):
    a = _adapter_copy(ctx)
    shutil.copy(ctx.poly / "adapter" / "adapter_config.json", a / "adapter_config.json")
    return _load_error(ctx, a, str(a))


@case("adapter", "weights-in-float16-without-checksum")
def _(ctx):
    import torch
    from safetensors.torch import load_file, save_file

    from orchmoe import load_adapter

    a = _adapter_copy(ctx)
    t = load_file(str(a / "adapter_model.safetensors"))
    save_file({k: v.half() for k, v in t.items()}, str(a / "adapter_model.safetensors"))
    _edit_json(a / "adapter_config.json", lambda m: m["orchmoe"].pop("weights_sha256"))
    try:
        model = load_adapter(_base(ctx), a)
    except Exception as e:  # noqa: BLE001
        return judge_exception(e, "float16")
    state = model.base_model.adapter_state_dict()
    close = all(torch.allclose(state[k].float(), t[k].half().float()) for k in state if k in t)
    return ("SENSIBLE", "cast to the model's float32") if close else ("SILENT", "other values")


@case("adapter", "integer-weights-without-checksum")
def _(ctx):
    from safetensors.torch import load_file, save_file

    a = _adapter_copy(ctx)
    t = load_file(str(a / "adapter_model.safetensors"))
    save_file(
        {k: (v * 100).int() if v.is_floating_point() else v for k, v in t.items()}, str(a / "adapter_model.safetensors")
    )
    _edit_json(a / "adapter_config.json", lambda m: m["orchmoe"].pop("weights_sha256"))
    return _load_error(ctx, a, "adapter_model.safetensors", "int")


@case("adapter", "weights-are-a-fifo", timeout=30)
def _(ctx):
    a = _adapter_copy(ctx)
    (a / "adapter_model.safetensors").unlink()
    os.mkfifo(a / "adapter_model.safetensors")
    return _load_error(ctx, a, "FIFO")


@case("adapter", "weights-link-to-dev-zero", timeout=30)
def _(ctx):
    a = _adapter_copy(ctx)
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.safetensors").symlink_to("/dev/zero")
    return _load_error(ctx, a, "adapter_model.safetensors")


@case("adapter", "config-claims-a-million-skills", timeout=60)
def _(ctx):
    a = _adapter_copy(ctx)
    _edit_json(a / "adapter_config.json", lambda m: m.update(n_skills=1_000_000))
    return _load_error(ctx, a, "adapter_config.json")


@case("adapter", "poly-config-claims-a-billion-tasks", timeout=60)
def _(ctx):
    a = _adapter_copy(ctx, ctx.poly / "adapter")
    _edit_json(a / "adapter_config.json", lambda m: m.update(n_tasks=1_000_000_000))
    return _load_error(ctx, a, "adapter_config.json")


@case("adapter", "task-type-garbage")
def _(ctx):
    a = _adapter_copy(ctx)
    _edit_json(a / "adapter_config.json", lambda m: m.update(task_type="FOO"))
    return _load_error(ctx, a, "FOO")


@case("adapter", "dropout-five")
def _(ctx):
    a = _adapter_copy(ctx)
    _edit_json(a / "adapter_config.json", lambda m: m.update(dropout=5))
    return _load_error(ctx, a, "dropout")


@case("adapter", "lora-a-and-b-swapped")
def _(ctx):
    from safetensors.torch import load_file, save_file

    a = _adapter_copy(ctx)
    t = load_file(str(a / "adapter_model.safetensors"))
    swapped = {}
    for k, v in t.items():
        other = k.replace("lora_A", "lora_B") if "lora_A" in k else k.replace("lora_B", "lora_A")
        swapped[other] = v
    save_file(swapped, str(a / "adapter_model.safetensors"))
    return _load_error(ctx, a, "shape")


@case("adapter", "legacy-0.2-with-a-string-rank")
def _(ctx):
    a = _adapter_copy(ctx)
    meta = json.loads((a / "adapter_config.json").read_text())
    fields = {
        k: v for k, v in meta.items() if k not in ("orchmoe", "peft_type", "task_type", "base_model_name_or_path")
    }
    fields.update(method="orchmoe", rank="2")
    legacy = {"format": "orchmoe-adapter", "orchmoe_version": "0.2.0", "method": "orchmoe", "config": fields,
              "layers": meta["orchmoe"]["layers"], "base_model": {"name": "tiny"}, "metadata": {}}  # fmt: skip
    (a / "adapter_config.json").write_text(json.dumps(legacy))
    return _load_error(ctx, a, "rank")


@case("adapter", "legacy-0.2-layers-not-shapes")
def _(ctx):
    a = _adapter_copy(ctx)
    meta = json.loads((a / "adapter_config.json").read_text())
    fields = {
        k: v for k, v in meta.items() if k not in ("orchmoe", "peft_type", "task_type", "base_model_name_or_path")
    }
    fields.update(method="orchmoe")
    legacy = {"format": "orchmoe-adapter", "orchmoe_version": "0.2.0", "method": "orchmoe", "config": fields,
              "layers": {k: "wide" for k in meta["orchmoe"]["layers"]}, "base_model": {"name": "tiny"}}  # fmt: skip
    (a / "adapter_config.json").write_text(json.dumps(legacy))
    return _load_error(ctx, a, "layer")


@case("adapter", "save-over-a-link-to-an-adapter")
def _(ctx):
    from orchmoe import save_adapter

    real = _adapter_copy(ctx)
    before = tree_bytes(real)
    (ctx.tmp / "link").symlink_to(real, target_is_directory=True)
    model = _loaded(ctx)
    verdict = clear_raise(lambda: save_adapter(model, ctx.tmp / "link"), "link")
    return ("LOST", "the linked adapter was replaced") if tree_bytes(real) != before else verdict


# == 5. the Python API ==========================================================================================
@case("api", "load-adapter-twice-onto-one-base")
def _(ctx):
    from orchmoe import load_adapter

    base = _base(ctx)
    load_adapter(base, ctx.adapter)
    return clear_raise(lambda: load_adapter(base, ctx.adapter), "already carries")


@case("api", "save-pretrained-onto-a-file")
def _(ctx):
    f = _write(ctx.tmp / "weights.bin", b"mine")
    model = _loaded(ctx)
    verdict = clear_raise(lambda: model.save_pretrained(str(f)), "weights.bin")
    return ("LOST", "the file was replaced") if f.read_bytes() != b"mine" else verdict


@case("api", "export-over-an-export-holding-a-users-file")
def _(ctx):
    model = _loaded(ctx).base_model
    dest = model.export_peft_lora(ctx.tmp / "export", abstract_task=0)
    _write(dest / "NOTES.md", "mine\n")
    verdict = clear_raise(lambda: model.export_peft_lora(dest, overwrite=True, abstract_task=1), "NOTES.md")
    return (
        ("LOST", "the user's NOTES.md in the export folder was deleted")
        if not (dest / "NOTES.md").exists()
        else verdict
    )


@case("api", "export-to-an-empty-path")
def _(ctx):
    model = _loaded(ctx).base_model
    verdict = clear_raise(lambda: model.export_peft_lora("", abstract_task=0), "empty")
    if (ctx.tmp / "adapter_config.json").exists():
        return "SILENT", "'' exported into the working directory"
    return verdict


@case("api", "get-model-with-a-method-name")
def _(ctx):
    from orchmoe import get_model

    return clear_raise(lambda: get_model(_base(ctx), "orchmoe"), "config")


@case("api", "get-model-with-none")
def _(ctx):
    from orchmoe import get_model

    return clear_raise(lambda: get_model(_base(ctx), None), "config")


@case("api", "generate-an-empty-prompt")
def _(ctx):
    import torch

    model = _loaded(ctx)
    return clear_raise(lambda: model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), "empty")


@case("api", "generate-with-a-zero-attention-mask")
def _(ctx):
    import torch

    model = _loaded(ctx)
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.zeros_like(ids), max_new_tokens=2, do_sample=False)
    except Exception as e:  # noqa: BLE001
        return judge_exception(e, "attention_mask")
    pi = model.base_model.routing_state.task_probs
    if pi is not None and not bool(torch.isfinite(pi).all()):
        return "SILENT", f"generated {out[0, -2:].tolist()} under a NaN routing"
    return "SENSIBLE", "a finite routing"


@case("api", "export-an-abstract-task-out-of-range")
def _(ctx):
    model = _loaded(ctx).base_model
    return clear_raise(lambda: model.export_peft_lora(ctx.tmp / "x", abstract_task=99), "99")


@case("api", "generate-with-task-ids-as-text")
def _(ctx):
    import torch

    model = _loaded(ctx, ctx.poly)
    return clear_raise(
        lambda: model.generate(input_ids=torch.tensor([[5, 6]]), task_ids="0", max_new_tokens=1), "task_ids"
    )


@case("api", "save-after-merge-and-unload")
def _(ctx):
    a = _adapter_copy(ctx)
    before = tree_bytes(a)
    model = _loaded(ctx)
    model.base_model.merge_and_unload(abstract_task=0)
    verdict = clear_raise(lambda: model.save_pretrained(str(a)), "unloaded")
    return ("LOST", "the adapter was overwritten by an unloaded model") if tree_bytes(a) != before else verdict


@case("api", "load-adapter-from-the-run-folder")
def _(ctx):
    from orchmoe import load_adapter

    return clear_raise(lambda: load_adapter(_base(ctx), ctx.run), "adapter")


@case("api", "save-adapter-with-metadata-that-is-not-json")
def _(ctx):
    from orchmoe import save_adapter

    a = _adapter_copy(ctx)
    before = tree_bytes(a)
    model = _loaded(ctx)
    verdict = clear_raise(lambda: save_adapter(model, a, metadata={"when": object()}), "metadata")
    return ("LOST", "the adapter was changed") if tree_bytes(a) != before else verdict


# == 6. predict and export ======================================================================================
def _predict(ctx: Ctx, inp: Path, out: Path, *extra, run: Path | None = None):
    return cli("predict", run or ctx.run, "--input", inp, "--output", out, "--no-progress", *extra)


_ROW = {"definition": "Say the year.", "input": "France", "task": TASK}


@case("predict", "input-not-utf8")
def _(ctx):
    f = _write(ctx.tmp / "rows.jsonl", b'{"prompt": "caf\xe9"}\n')
    return clear_cli(_predict(ctx, f, ctx.tmp / "out.jsonl"), "rows.jsonl")


@case("predict", "input-is-a-fifo", timeout=30)
def _(ctx):
    os.mkfifo(ctx.tmp / "rows.jsonl")
    return clear_cli(_predict(ctx, ctx.tmp / "rows.jsonl", ctx.tmp / "out.jsonl"), "FIFO")


@case("predict", "input-corrupt-parquet")
def _(ctx):
    f = _write(ctx.tmp / "rows.parquet", b"PAR1" + os.urandom(200) + b"PAR1")
    return clear_cli(_predict(ctx, f, ctx.tmp / "out.jsonl"), "rows.parquet")


@case("predict", "row-definition-is-a-list")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW, {**_ROW, "definition": ["Say", "the year."]}])
    res = _predict(ctx, f, ctx.tmp / "out.jsonl")
    if res.rc == 0:
        rec = json.loads((ctx.tmp / "out.jsonl").read_text().splitlines()[1])
        return ("SILENT", "a list stringified into the prompt") if "error" not in rec else ("CLEAR", rec["error"])
    return clear_cli(res, "definition")


@case("predict", "row-examples-is-a-string")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW, {**_ROW, "examples": "France -> 1789"}])
    res = _predict(ctx, f, ctx.tmp / "out.jsonl")
    if res.rc == 0:
        rec = json.loads((ctx.tmp / "out.jsonl").read_text().splitlines()[1])
        return ("SILENT", "a string taken as examples") if "error" not in rec else ("CLEAR", rec["error"][:150])
    return clear_cli(res, "examples")


@case("predict", "row-task-is-a-list-poly")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW, {**_ROW, "task": [TASK]}])
    res = _predict(ctx, f, ctx.tmp / "out.jsonl", run=ctx.poly)
    if res.rc == 0:
        rec = json.loads((ctx.tmp / "out.jsonl").read_text().splitlines()[1])
        return ("SILENT", "a list taken as a task") if "error" not in rec else ("CLEAR", rec["error"][:150])
    return clear_cli(res, "task")


@case("predict", "parquet-output-with-mixed-ids")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [{**_ROW, "id": 1}, {**_ROW, "id": "two"}])
    res = _predict(ctx, f, ctx.tmp / "out.parquet")
    if res.rc == 0:
        import pyarrow.parquet as pq

        ids = pq.read_table(ctx.tmp / "out.parquet").column("id").to_pylist()
        return ("SENSIBLE", f"ids {ids}") if [str(i) for i in ids] == ["1", "two"] else ("SILENT", f"ids {ids}")
    return clear_cli(res, "id")


@case("predict", "journal-of-garbage")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW])
    _write(ctx.tmp / ".out.jsonl.partial", "garbage\n")
    return clear_cli(_predict(ctx, f, ctx.tmp / "out.jsonl"), ".out.jsonl.partial")


@case("predict", "output-is-a-folder")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW])
    (ctx.tmp / "out.jsonl").mkdir()
    return clear_cli(_predict(ctx, f, ctx.tmp / "out.jsonl", "--overwrite"), "out.jsonl")


@case("predict", "output-is-the-input-through-a-link")
def _(ctx):
    f = _rows_file(ctx.tmp / "rows.jsonl", [_ROW])
    before = f.read_bytes()
    (ctx.tmp / "out.jsonl").symlink_to(f)
    res = _predict(ctx, f, ctx.tmp / "out.jsonl", "--overwrite")
    return ("LOST", "the input was overwritten") if f.read_bytes() != before else clear_cli(res, "input")


@case("export", "out-over-an-export-holding-a-users-file")
def _(ctx):
    dest = ctx.tmp / "lora"
    first = cli("export", ctx.run, "--out", dest, "--abstract-task", "0", "--device", "cpu")
    if first.rc != 0:
        return clear_cli(first)
    _write(dest / "NOTES.md", "mine\n")
    res = cli("export", ctx.run, "--out", dest, "--abstract-task", "1", "--overwrite", "--device", "cpu")
    return (
        ("LOST", "--overwrite deleted the user's NOTES.md")
        if not (dest / "NOTES.md").exists()
        else clear_cli(res, "NOTES.md")
    )


@case("export", "bundle-over-a-bundle-holding-a-users-file")
def _(ctx):
    dest = ctx.tmp / "bundle"
    args = ["export", ctx.poly, "--bundle", dest, "--check", "0", "--device", "cpu"]
    first = cli(*args)
    if first.rc != 0:
        return clear_cli(first)
    _write(dest / "loras" / "my-notes.txt", "mine\n")
    res = cli(*args, "--overwrite")
    if not (dest / "loras" / "my-notes.txt").exists():
        return "LOST", "--overwrite deleted the user's file inside the bundle"
    return clear_cli(res, "my-notes.txt")


@case("export", "out-is-dev-null")
def _(ctx):
    return clear_cli(
        cli("export", ctx.run, "--out", "/dev/null", "--abstract-task", "0", "--device", "cpu"), "/dev/null"
    )


@case("export", "prompts-file-not-utf8")
def _(ctx):
    f = _write(ctx.tmp / "prompts.jsonl", b'{"prompt": "caf\xe9"}\n')
    res = cli("export", ctx.run, "--bundle", ctx.tmp / "b", "--prompts", f, "--check", "0", "--device", "cpu")
    return clear_cli(res, "prompts.jsonl")


@case("export", "task-id-for-a-prompt-routed-method")
def _(ctx):
    return clear_cli(cli("export", ctx.run, "--out", ctx.tmp / "x", "--task-id", "1", "--device", "cpu"), "task")


@case("export", "task-id-out-of-range-poly")
def _(ctx):
    return clear_cli(cli("export", ctx.poly, "--out", ctx.tmp / "x", "--task-id", "999", "--device", "cpu"), "999")
