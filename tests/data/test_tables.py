"""Data in Hugging Face formats (read with ``datasets``): every accepted layout, and clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from orchmoe.data import (
    DataError,
    available_tasks,
    format_prompt,
    load_multitask,
    load_task,
    open_source,
    read_split,
    select_tasks,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ni_rows(task: str, n: int, *, extra_refs: int = 0, with_task: bool = True) -> list[dict]:
    """Rows in the Muennighoff/natural-instructions layout: one row per reference output."""
    rows = []
    for i in range(n):
        for r in range(1 + (extra_refs if i % 2 == 0 else 0)):
            row = {
                "id": f"{task}-{i}",
                "definition": f"Solve {task}.",
                "inputs": f"{task} input {i}",
                "targets": f"answer {i}" + (f" v{r}" if r else ""),
            }
            rows.append({"task_name": task, **row} if with_task else row)
    return rows


# ------------------------------------------------------------------------------------------
# natural-instructions layout


def test_ni_jsonl_file_groups_references_and_samples_disjoint_sets(tmp_path):
    path = write_jsonl(tmp_path / "ni.jsonl", ni_rows("task1_a", 20, extra_refs=2) + ni_rows("task2_b", 20))
    task = load_task(path, "task1_a")
    assert task.definition == "Solve task1_a." and task.positive_examples == [] and task.category == "Unknown"
    assert len(task.instances) == 20
    assert task.instances[0] == {
        "id": "task1_a-0",
        "input": "task1_a input 0",
        "output": ["answer 0", "answer 0 v1", "answer 0 v2"],
    }
    assert task.instances[1]["output"] == ["answer 1"]
    assert task.source_path == path

    data = load_multitask(path, 2, n_train=15, n_eval=5, seed=0)
    assert data.seen_tasks == ["task1_a", "task2_b"] and data.unseen_tasks == [] and data.unseen == []
    assert data.data_dir == path
    for name in data.seen_tasks:
        tr = {e.id for e in data.train if e.task == name}
        ev = {e.id for e in data.eval if e.task == name}
        assert len(tr) == 15 and len(ev) == 5 and not tr & ev
    with_refs = next(e for e in data.train + data.eval if e.id == "task1_a-0")
    assert with_refs.references == ("answer 0", "answer 0 v1", "answer 0 v2") and with_refs.target == "answer 0"
    again = load_multitask(path, 2, n_train=15, n_eval=5, seed=0)
    assert again.train == data.train and again.eval == data.eval
    other = load_multitask(path, 2, n_train=15, n_eval=5, seed=1)
    assert {e.id for e in other.eval} != {e.id for e in data.eval}


def test_hub_folder_train_is_seen_test_is_unseen(tmp_path):
    root = tmp_path / "natural-instructions"
    for t in ("task001_x", "task002_y", "task003_z"):
        write_jsonl(root / "train" / f"{t}_train.jsonl", ni_rows(t, 15))
    write_jsonl(root / "test" / "task900_held_test.jsonl", ni_rows("task900_held", 8))
    write_jsonl(root / "test" / "task901_old_test.jsonl", ni_rows("task901_old", 8, with_task=False))
    assert available_tasks(root) == ["task001_x", "task002_y", "task003_z", "task900_held", "task901_old"]
    assert read_split(root, "default", "train") == ["task001_x", "task002_y", "task003_z"]
    assert read_split(root, "default", "test") == ["task900_held", "task901_old"]  # name from the file stem

    data = load_multitask(root, 2, n_train=10, n_eval=3, n_unseen_eval=4, seed=0)
    assert len(data.seen_tasks) == 2 and set(data.seen_tasks) <= {"task001_x", "task002_y", "task003_z"}
    assert data.unseen_tasks == ["task900_held", "task901_old"]
    assert len(data.unseen) == 8 and all(e.task_id == -1 for e in data.unseen)
    assert [e.id for e in data.unseen if e.task == "task901_old"] == [f"task901_old-{i}" for i in range(4)]
    assert set(data.task_defs) == set(data.seen_tasks) | set(data.unseen_tasks)
    assert all(t.instances == [] for t in data.task_defs.values())
    assert load_multitask(root, 2, n_train=10, n_eval=3, n_unseen_tasks=1).unseen_tasks in (
        ["task900_held"],
        ["task901_old"],
    )
    assert load_multitask(root, "all", n_train=10, n_eval=3).seen_tasks == ["task001_x", "task002_y", "task003_z"]
    with pytest.raises(DataError, match=r"has no split 'nosplit'"):
        load_multitask(root, 1, split="nosplit", n_train=10, n_eval=3)


def test_parquet_with_list_targets_and_demonstrations(tmp_path):
    demos = [{"input": "demo in", "output": "demo out", "explanation": "because"}]
    rows = [
        {
            "task_name": "task7_p",
            "id": f"p-{i}",
            "definition": "Echo.",
            "inputs": f"q{i}",
            "targets": [f"a{i}", f"b{i}"],
            "positive_examples": demos,
            "categories": ["Echoing"],
        }
        for i in range(9)
    ]
    path = tmp_path / "ni.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    task = load_task(path, "task7_p")
    assert task.instances[3] == {"id": "p-3", "input": "q3", "output": ["a3", "b3"]}
    assert task.positive_examples == [{"input": "demo in", "output": "demo out", "explanation": "because"}]
    assert task.category == "Echoing"
    assert "Positive Example 1 -\nInput: demo in\nOutput: demo out" in format_prompt(task, "q3")
    data = load_multitask(path, ["task7_p"], n_train=5, n_eval=2)
    assert data.train[0].category == "Echoing" and len(data.train) == 5


def test_demonstrations_as_a_json_string(tmp_path):
    demos = json.dumps([{"input": "i", "output": ["o"]}])
    path = write_jsonl(tmp_path / "d.jsonl", [dict(r, pos_examples=demos) for r in ni_rows("t", 3)])
    assert load_task(path, "t").positive_examples == [{"input": "i", "output": "o", "explanation": ""}]


# ------------------------------------------------------------------------------------------
# Generic instruction data


def test_instruction_data_with_task_column(tmp_path):
    rows = [
        {"task": "translate", "instruction": "Translate to French.", "input": f"word{i}", "output": f"mot{i}"}
        for i in range(8)
    ]
    rows += [
        {
            "task": "mixed",
            "instruction": f"Question {i}?",
            "input": "" if i % 2 else f"context {i}",
            "output": [f"r{i}", f"s{i}"],
        }
        for i in range(8)
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    shared = load_task(path, "translate")
    assert shared.definition == "Translate to French."  # one instruction for the whole task: the definition
    assert shared.instances[2] == {"id": "translate-2", "input": "word2", "output": ["mot2"]}
    mixed = load_task(path, "mixed")  # instructions differ: each goes in front of its input
    assert mixed.definition == ""
    assert mixed.instances[0] == {"id": "mixed-0", "input": "Question 0?\n\ncontext 0", "output": ["r0", "s0"]}
    assert mixed.instances[1]["input"] == "Question 1?"
    data = load_multitask(path, "all", n_train=5, n_eval=2)
    assert data.seen_tasks == ["mixed", "translate"] and data.task_to_id == {"mixed": 0, "translate": 1}


def test_caller_named_task_column_and_one_task_per_file(tmp_path):
    rows = [{"family": f"f{i % 3}", "input": f"x{i}", "output": f"y{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "fam.jsonl", rows)
    with pytest.raises(DataError, match=r"missing task column 'kind'.*columns found: \['family', 'input', 'output'\]"):
        load_multitask(path, 1, n_train=3, n_eval=2, task_column="kind")
    data = load_multitask(path, 3, n_train=6, n_eval=2, task_column="family")
    assert data.seen_tasks == ["f0", "f1", "f2"] and data.source_options == {"task_column": "family"}
    assert load_task(path, "f1", task_column="family").instances[0]["input"] == "x1"
    # without a task column the file is one task, named after the file
    assert available_tasks(path) == ["fam"]


def test_prompt_completion_folder_one_task_per_file(tmp_path):
    for name in ("arith", "capitals", "colours"):
        write_jsonl(
            tmp_path / "pc" / f"{name}.jsonl",
            [{"prompt": f"{name} prompt {i}", "completion": f"{name} {i}"} for i in range(10)],
        )
    root = tmp_path / "pc"
    data = load_multitask(root, 2, n_train=6, n_eval=2, n_unseen_tasks=["colours"], n_unseen_eval=3, seed=0)
    assert data.seen_tasks == ["arith", "capitals"]  # the named unseen task is never drawn as seen
    assert data.unseen_tasks == ["colours"] and len(data.unseen) == 3
    assert data.unseen[0].input == "colours prompt 0" and data.unseen[0].references == ("colours 0",)
    assert data.task_defs["arith"].definition == ""
    # no splits: every task is seen; unseen tasks only by name
    assert load_multitask(root, 3, n_train=6, n_eval=2).unseen_tasks == []
    with pytest.raises(DataError, match="has 0 .*no test tasks: name the unseen tasks"):
        load_multitask(root, 2, n_train=6, n_eval=2, n_unseen_tasks=1)
    with pytest.raises(DataError, match="both seen"):
        load_multitask(root, ["arith"], n_train=6, n_eval=2, n_unseen_tasks="arith")


def test_saved_dataset_dict_folder(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ni_rows("tA", 6) + ni_rows("tB", 6)),
            "test": datasets.Dataset.from_list(ni_rows("tC", 4)),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    data = load_multitask(tmp_path / "saved", "all", n_train=4, n_eval=2)
    assert data.seen_tasks == ["tA", "tB"] and data.unseen_tasks == ["tC"] and len(data.unseen) == 4


def test_hub_id_goes_through_load_dataset(monkeypatch):
    calls = []
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ni_rows("tA", 6)), "test": datasets.Dataset.from_list(ni_rows("tZ", 3))}
    )

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(path)
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_multitask("someone/ni-mini", 1, n_train=3, n_eval=2)
    assert calls == ["someone/ni-mini"] and data.data_dir == "someone/ni-mini"
    assert data.seen_tasks == ["tA"] and data.unseen_tasks == ["tZ"]


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DataError,
        match=r"'nobody-here/no-such-data' is no local file or folder, and loading it from "
        r"the Hugging Face Hub failed: .*Offline\?.*HF_DATASETS_OFFLINE",
    ):
        load_multitask("nobody-here/no-such-data", 1)


# ------------------------------------------------------------------------------------------
# Errors


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_multitask(str(tmp_path / "nope.jsonl"), 1)
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data file type '\.csv'"):
        load_multitask(tmp_path / "data.csv", 1)


def test_broken_file_is_named(tmp_path):
    write_jsonl(tmp_path / "d" / "good.jsonl", ni_rows("good", 4))
    (tmp_path / "d" / "bad.jsonl").write_text('{"task_name": "bad", "inputs": "x", "targets": "y"}\n{"task_name": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot be read as JSON / JSON lines \(.*"):
        load_multitask(tmp_path / "d", 1, n_train=2, n_eval=1)


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"task_name": "t", "id": "1", "inputs": "x", "answer": "y"}])
    with pytest.raises(
        DataError,
        match=r"m\.jsonl: missing column 'targets' for the natural-instructions layout"
        r".*columns found: \['task_name', 'id', 'inputs', 'answer'\]",
    ):
        load_multitask(path, 1)
    other = write_jsonl(tmp_path / "o.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"o\.jsonl: no known column set.*columns found: \['question', 'answer'\]"):
        load_task(other, "o")


def test_official_task_file_gets_a_hint(tmp_path):
    path = tmp_path / "task001.json"
    path.write_text(
        json.dumps(
            {
                "Definition": ["d"],
                "Positive Examples": [],
                "Categories": ["c"],
                "Instances": [{"id": "1", "input": "x", "output": ["y"]}],
            }
        )
    )
    with pytest.raises(DataError, match="official SuperNI task file: pass the folder"):
        load_task(path, "task001")


def test_null_input_or_output_names_file_and_row(tmp_path):
    rows = ni_rows("t", 4)
    rows[2]["inputs"] = None
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(DataError, match=r"n\.jsonl: row 3 \(task 't'\) has a null 'inputs'"):
        load_task(path, "t")
    rows = [{"prompt": "p", "completion": ["ok", None]}]
    with pytest.raises(DataError, match=r"l\.jsonl: row 1 \(task 'l'\) has a null 'completion'"):
        load_task(write_jsonl(tmp_path / "l.jsonl", rows), "l")
    rows = [{"task": "a", "input": "x", "output": "y"}, {"task": None, "input": "x", "output": "y"}]
    with pytest.raises(DataError, match=r"t2\.jsonl: row 2 has a null task name in column 'task'"):
        load_task(write_jsonl(tmp_path / "t2.jsonl", rows), "a")
    # a null input next to an instruction means "no input"
    rows = [{"instruction": "Name a colour.", "input": None, "output": "red"}]
    assert load_task(write_jsonl(tmp_path / "i.jsonl", rows), "i").instances[0]["input"] == ""


def test_duplicate_ids_merge_references_or_fail_on_other_input(tmp_path):
    rows = ni_rows("t", 3)
    rows.append(dict(rows[1]))  # an exact repeat: the reference is not added twice
    rows.append(dict(rows[1], targets="second answer"))
    task = load_task(write_jsonl(tmp_path / "dup.jsonl", rows), "t")
    assert len(task.instances) == 3 and task.instances[1]["output"] == ["answer 1", "second answer"]
    rows.append(dict(rows[0], inputs="another input"))
    with pytest.raises(DataError, match=r"row 6 \(task 't'\): instance id 't-0' is also at .*row 1 with another input"):
        load_task(write_jsonl(tmp_path / "dup2.jsonl", rows), "t")


def test_empty_files(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_multitask(tmp_path / "empty.jsonl", 1)
    folder = tmp_path / "f"
    write_jsonl(folder / "good.jsonl", ni_rows("good", 6))
    (folder / "blank.jsonl").write_text("")
    with caplog.at_level(logging.WARNING):
        data = load_multitask(folder, 1, n_train=3, n_eval=2)
    assert data.seen_tasks == ["good"] and "skipping empty data file" in caplog.text and "blank.jsonl" in caplog.text


def test_split_file_next_to_tables_warns_about_missing_tasks(tmp_path, caplog):
    root = tmp_path / "t"
    for name in ("a", "b"):
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{name}{i}", "completion": "x"} for i in range(5)])
    (root / "splits" / "mine").mkdir(parents=True)
    (root / "splits" / "mine" / "train_tasks.txt").write_text("a\nghost\n")
    (root / "splits" / "mine" / "test_tasks.txt").write_text("b\n")
    with caplog.at_level(logging.WARNING):
        assert select_tasks(root, "mine") == ["a"]
    assert "lists 2 train tasks; only 1 have data in" in caplog.text
    data = load_multitask(root, "all", split="mine", n_train=3, n_eval=1)
    assert data.seen_tasks == ["a"] and data.unseen_tasks == ["b"]
    with pytest.raises(DataError, match=r"no task in .* named: ghost"):
        select_tasks(root, ["a", "ghost"])


def test_open_source_is_reused_until_a_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", ni_rows("t", 3))
    first = open_source(path)
    assert open_source(path) is first
    write_jsonl(path, ni_rows("t", 3) + ni_rows("u", 2))
    second = open_source(path)
    assert second is not first and second.task_names() == ["t", "u"]


def test_folder_mixing_layouts_and_a_file_missing_a_column(tmp_path):
    folder = tmp_path / "mix"
    write_jsonl(folder / "a_ni.jsonl", ni_rows("ni_task", 4))
    write_jsonl(folder / "b_pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    assert available_tasks(folder) == ["b_pc", "ni_task"]
    assert load_task(folder, "b_pc").instances[1] == {"id": "b_pc-1", "input": "p1", "output": ["c1"]}
    # same columns as the first file except one: named as a missing column of that file, not as nulls
    write_jsonl(folder / "c_ni.jsonl", [{k: v for k, v in r.items() if k != "targets"} for r in ni_rows("other", 3)])
    with pytest.raises(
        DataError,
        match=r"c_ni\.jsonl: missing column 'targets'.*columns found: "
        r"\['task_name', 'id', 'definition', 'inputs'\]",
    ):
        load_multitask(folder, 1, n_train=2, n_eval=1)


def test_many_files_are_read_by_folder_and_errors_still_name_the_file(tmp_path, monkeypatch):
    from orchmoe.data import reading

    monkeypatch.setattr(reading, "PER_FILE_LIMIT", 2)  # "many" files without writing hundreds
    root = tmp_path / "hub"
    for t in ("t1", "t2", "t3", "t4"):
        write_jsonl(root / "train" / f"{t}_train.jsonl", ni_rows(t, 6, extra_refs=1))
    write_jsonl(root / "test" / "u1_test.jsonl", ni_rows("u1", 4))
    source = open_source(root)
    assert sorted(len(p.files) for p in source.parts) == [1, 4]  # one table per train/test folder
    data = load_multitask(root, "all", n_train=4, n_eval=2, n_unseen_eval=3)
    assert data.seen_tasks == ["t1", "t2", "t3", "t4"] and data.unseen_tasks == ["u1"]
    assert load_task(root, "t3").instances[0]["output"] == ["answer 0", "answer 0 v1"]
    assert load_task(root, "t3").source_path == root / "train" / "t3_train.jsonl"
    rows = ni_rows("t5", 6)
    rows[4]["targets"] = None
    write_jsonl(root / "train" / "t5_train.jsonl", rows)
    with pytest.raises(DataError, match=r"t5_train\.jsonl: row 5 \(task 't5'\) has a null 'targets'"):
        load_task(root, "t5")
    # without a task column many files are read one by one, each named after its file
    flat = tmp_path / "flat"
    for t in ("a", "b", "c"):
        write_jsonl(flat / f"{t}.jsonl", [{"prompt": f"{t}{i}", "completion": "x"} for i in range(3)])
    assert available_tasks(flat) == ["a", "b", "c"]


def test_nan_cells_are_missing_values_not_text(tmp_path):
    """A float column with a NaN (how pandas writes an empty cell) never puts "nan" into a prompt or an answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ni_rows("t_a", 6)
    for i, r in enumerate(rows):
        r["inputs"] = float("nan") if i == 3 else float(i)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 4 \(task 't_a'\) has nan as its 'inputs' \(a missing value"):
        load_task(tmp_path / "d.parquet", "t_a")
    write_jsonl(tmp_path / "e.jsonl", ni_rows("t_a", 3))
    (tmp_path / "e.jsonl").write_text((tmp_path / "e.jsonl").read_text().replace('"answer 1"', "NaN"))
    with pytest.raises(DataError, match="e.jsonl: row 2"):
        load_task(tmp_path / "e.jsonl", "t_a")


@pytest.mark.parametrize("name", ["", "   "], ids=["empty", "blank"])
def test_an_empty_task_name_is_named(name, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ni_rows("t_b", 3) + ni_rows(name, 3))
    with pytest.raises(DataError, match=r"d.jsonl: row 4 has an empty task name in column 'task_name'"):
        available_tasks(tmp_path / "d.jsonl")


def test_a_json_file_of_columns_and_a_fifo_are_named(tmp_path):
    import os

    rows = ni_rows("t_a", 3)
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    with pytest.raises(DataError, match=r"cols.json: column 'task_name' holds list<item: string> values, not task"):
        available_tasks(tmp_path / "cols.json")
    os.mkfifo(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=r"rows.jsonl' is a FIFO \(named pipe\), not a data folder or file"):
        open_source(tmp_path / "rows.jsonl")
    write_jsonl(tmp_path / "data" / "a.jsonl", ni_rows("t_a", 3))
    os.mkfifo(tmp_path / "data" / "b.jsonl")  # beside real data: skipped, never opened
    assert available_tasks(tmp_path / "data") == ["t_a"]
