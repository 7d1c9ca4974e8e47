"""The SuperNI loader on the real task files in ../shared/superni and on deliberately broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchmoe.data import (
    DataError,
    Example,
    load_multitask,
    load_task,
    read_split,
    sample_instances,
    select_tasks,
    unseen_eval_instances,
)
from orchmoe.data.superni import SuperNITask


def _repo_root() -> Path:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError("no pyproject.toml above the tests: cannot locate the repository root")


@pytest.fixture(scope="module")
def shared() -> Path:
    path = (_repo_root().parent / "shared" / "superni").resolve()
    if not (path / "tasks").is_dir():
        pytest.fail(
            f"SuperNI test data not found at {path}: the 'shared/superni' folder must sit beside "
            "the repository (shared/superni/tasks/*.json, shared/superni/splits/...)"
        )
    return path


WINOGRANDE = "task033_winogrande_answer_generation"  # a test-split task with exactly 100 instances


# ------------------------------------------------------------------------------------------
# Real task files


def test_load_real_task_matches_raw_json(shared):
    raw = json.loads((shared / "tasks" / f"{WINOGRANDE}.json").read_text(encoding="utf-8"))
    task = load_task(shared, WINOGRANDE)
    assert isinstance(task, SuperNITask)
    assert task.name == WINOGRANDE
    assert task.definition == " ".join(d.strip() for d in raw["Definition"]).strip()
    assert task.categories == raw["Categories"] and task.category == raw["Categories"][0]
    assert len(task.instances) == len(raw["Instances"]) == 100
    first = task.instances[0]
    assert first == {
        "id": raw["Instances"][0]["id"],
        "input": raw["Instances"][0]["input"],
        "output": raw["Instances"][0]["output"],
    }
    assert all(isinstance(i["output"], list) and i["output"] for i in task.instances)
    assert len(task.positive_examples) == len(raw["Positive Examples"])
    assert set(task.positive_examples[0]) == {"input", "output", "explanation"}
    assert task.positive_examples[0]["output"] == raw["Positive Examples"][0]["output"]


def test_read_split_counts(shared):
    assert len(read_split(shared, "default", "train")) == 756
    assert len(read_split(shared, "default", "test")) == 119
    available = read_split(shared, "available", "train")
    assert len(available) == 204
    assert all((shared / "tasks" / f"{n}.json").is_file() for n in available)
    assert WINOGRANDE in read_split(shared, "available", "test")


def test_read_split_missing_names_the_file(shared):
    with pytest.raises(DataError, match=r"nosuchsplit.*train_tasks\.txt"):
        read_split(shared, "nosuchsplit", "train")
    with pytest.raises(ValueError):
        read_split(shared, "default", "dev")


def test_select_tasks_int_is_seeded_sorted_and_present(shared):
    a = select_tasks(shared, 10, split="default", seed=0)
    assert a == select_tasks(shared, 10, split="default", seed=0)
    assert a == sorted(a) and len(set(a)) == 10
    pool = set(read_split(shared, "available", "train"))
    assert set(a) <= pool  # drawn from the default train split, restricted to present files
    assert a != select_tasks(shared, 10, split="default", seed=1)
    assert select_tasks(shared, " 10 ", seed=0) == a  # a count given as a command-line string


def test_select_tasks_int_too_many(shared):
    with pytest.raises(DataError, match=r"asked for 205 tasks but only 204"):
        select_tasks(shared, 205)


def test_select_tasks_min_instances(shared):
    names = select_tasks(shared, 3, seed=3, min_instances=1100)
    assert len(names) == 3
    assert all(len(load_task(shared, n).instances) >= 1100 for n in names)


def test_select_tasks_string_forms(shared, tmp_path):
    names = read_split(shared, "available", "train")[:3]
    assert select_tasks(shared, ",".join(names)) == names
    assert select_tasks(shared, names[0]) == [names[0]]
    assert select_tasks(shared, list(names) + [names[0]]) == names  # duplicates removed
    listing = tmp_path / "mine.txt"
    listing.write_text("# my tasks\n" + "\n".join(names) + "\n\n")
    assert select_tasks(shared, str(listing)) == names
    assert select_tasks(shared, "available") == read_split(shared, "available", "train")
    with pytest.raises(DataError, match="task999_nope"):
        select_tasks(shared, f"{names[0]},task999_nope")
    many = read_split(shared, "available", "train")[:12]  # longer than a file name may be
    assert len(",".join(many)) > 255
    assert select_tasks(shared, ",".join(many)) == many


def test_select_tasks_split_name_keeps_present_and_warns(shared, caplog):
    with caplog.at_level("WARNING"):
        names = select_tasks(shared, "default")
    assert len(names) == 204
    assert "only 204 have a task file" in caplog.text


def test_sample_instances_disjoint_and_reproducible(shared):
    task = load_task(shared, select_tasks(shared, 1, seed=0, min_instances=1100)[0])
    train, ev = sample_instances(task, 1000, 100, seed=0)
    assert len(train) == 1000 and len(ev) == 100
    train_ids, eval_ids = {i["id"] for i in train}, {i["id"] for i in ev}
    assert len(train_ids) == 1000 and not train_ids & eval_ids
    assert sample_instances(task, 1000, 100, seed=0) == (train, ev)
    train2, ev2 = sample_instances(task, 1000, 100, seed=1)
    assert {i["id"] for i in ev2} != eval_ids
    # the eval set does not depend on n_train; n_train=None takes all the rest
    assert sample_instances(task, 10, 100, seed=0)[1] == ev
    rest, ev3 = sample_instances(task, None, 100, seed=0)
    assert ev3 == ev and len(rest) == len(task.instances) - 100


def test_sample_instances_too_few_names_task_and_count(shared):
    task = load_task(shared, WINOGRANDE)
    with pytest.raises(DataError, match=rf"{WINOGRANDE}.*only 100 instances"):
        sample_instances(task, 1000, 100, seed=0)
    with pytest.raises(DataError, match="only 100 instances"):
        sample_instances(task, None, 100, seed=0)  # nothing left to train on
    train, ev = sample_instances(task, 1000, 20, seed=0, allow_fewer_train=True)
    assert len(ev) == 20 and len(train) == 80


def test_unseen_eval_instances_are_the_first_n(shared):
    task = load_task(shared, WINOGRANDE)
    assert unseen_eval_instances(task, 10) == task.instances[:10]
    assert len(unseen_eval_instances(task, 1000)) == 100


def test_load_multitask_protocol(shared):
    data = load_multitask(shared, 4, split="default", n_train=30, n_eval=10, seed=0)
    assert data.seen_tasks == sorted(data.seen_tasks)
    assert data.task_to_id == {n: i for i, n in enumerate(data.seen_tasks)}
    assert data.num_tasks == 4 and data.id_to_task == data.seen_tasks
    assert len(data.train) == 4 * 30 and len(data.eval) == 4 * 10
    # unseen = every test-split task with a file here (14), first 100 instances each
    assert data.unseen_tasks == sorted(read_split(shared, "available", "test"))
    assert len(data.unseen) == 14 * 100
    assert not set(data.unseen_tasks) & set(data.seen_tasks)
    ex = data.train[0]
    assert isinstance(ex, Example)
    assert ex.task_id == data.task_to_id[ex.task] and ex.seen
    assert ex.category == load_task(shared, ex.task).category
    assert ex.references and ex.target == ex.references[0]
    assert set(ex.to_dict()) == {"task", "task_id", "category", "id", "input", "references"}
    assert all(e.task_id == -1 and not e.seen for e in data.unseen)
    for name in data.seen_tasks:
        tr = {e.id for e in data.train if e.task == name}
        ev = {e.id for e in data.eval if e.task == name}
        assert len(tr) == 30 and len(ev) == 10 and not tr & ev
    # task definitions kept for prompting, instances dropped
    assert set(data.task_defs) == set(data.seen_tasks) | set(data.unseen_tasks)
    assert all(t.instances == [] and t.definition for t in data.task_defs.values())
    # reproducible
    again = load_multitask(shared, 4, split="default", n_train=30, n_eval=10, seed=0)
    assert again.train == data.train and again.eval == data.eval


def test_load_multitask_unseen_options(shared):
    named = read_split(shared, "available", "test")[:2]
    d = load_multitask(shared, 2, n_train=20, n_eval=5, n_unseen_tasks=named, n_unseen_eval=7)
    assert d.unseen_tasks == sorted(named) and len(d.unseen) == 14
    d = load_multitask(shared, 2, n_train=20, n_eval=5, n_unseen_tasks=3, n_unseen_eval=1)
    assert len(d.unseen_tasks) == 3
    d = load_multitask(shared, 2, n_train=20, n_eval=5, n_unseen_tasks=0)
    assert d.unseen == [] and d.unseen_tasks == []
    seen = select_tasks(shared, 2, seed=0, min_instances=25)
    with pytest.raises(DataError, match="both seen"):
        load_multitask(shared, seen, n_train=20, n_eval=5, n_unseen_tasks=seen)


# ------------------------------------------------------------------------------------------
# Broken files


def _task_json(n_instances: int = 3) -> dict:
    return {
        "Definition": ["Copy the input."],
        "Positive Examples": [{"input": "a", "output": "a", "explanation": "copied"}],
        "Negative Examples": [],
        "Categories": ["Misc."],
        "Instances": [{"id": f"t-{i}", "input": f"x{i}", "output": [f"x{i}"]} for i in range(n_instances)],
    }


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    return tmp_path


def _write(data_dir: Path, name: str, content) -> Path:
    path = data_dir / "tasks" / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_missing_task_file(data_dir):
    with pytest.raises(DataError, match=r"task_missing\.json not found"):
        load_task(data_dir, "task_missing")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "nope", "t")
    with pytest.raises(DataError, match="no 'tasks/' folder"):
        load_task(tmp_path, "t")


def test_malformed_json_reports_file_and_position(data_dir):
    good = json.dumps(_task_json(), indent=1)
    _write(data_dir, "broken", good[:-30])  # cut off mid-file
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line \d+, column \d+"):
        load_task(data_dir, "broken")


def test_missing_required_keys(data_dir):
    content = _task_json()
    del content["Definition"], content["Categories"]
    _write(data_dir, "nokeys", content)
    with pytest.raises(DataError, match=r"nokeys\.json: missing required key\(s\) \['Definition', 'Categories'\]"):
        load_task(data_dir, "nokeys")


def test_empty_instances(data_dir):
    _write(data_dir, "empty", _task_json(0))
    with pytest.raises(DataError, match=r"empty\.json: 'Instances' is empty"):
        load_task(data_dir, "empty")


def test_instance_without_output(data_dir):
    content = _task_json()
    del content["Instances"][1]["output"]
    _write(data_dir, "noout", content)
    with pytest.raises(DataError, match=r"noout\.json: Instances\[1\] is missing key\(s\) \['output'\]"):
        load_task(data_dir, "noout")


def test_string_definition_and_output_are_accepted(data_dir):
    content = _task_json()
    content["Definition"] = ["  First part.", "Second part.  "]
    content["Instances"][0]["output"] = "x0"
    _write(data_dir, "lenient", content)
    task = load_task(data_dir, "lenient")
    assert task.definition == "First part. Second part."
    assert task.instances[0]["output"] == ["x0"]


def test_too_few_instances_via_load_multitask(data_dir):
    _write(data_dir, "small", _task_json(5))
    (data_dir / "splits" / "default" / "train_tasks.txt").write_text("small\n")
    (data_dir / "splits" / "default" / "test_tasks.txt").write_text("")
    with pytest.raises(DataError, match=r"'small' has only 5 instances; 10 train \+ 2 eval"):
        load_multitask(data_dir, ["small"], n_train=10, n_eval=2)
    with pytest.raises(DataError, match=r"only 0 tasks .* at least 12 instances"):
        load_multitask(data_dir, 1, n_train=10, n_eval=2)
    d = load_multitask(data_dir, 1, n_train=3, n_eval=2)
    assert len(d.train) == 3 and len(d.eval) == 2 and d.unseen == []


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "sub\\task", "nul\0name", "", "  "])
def test_task_and_split_names_never_leave_the_data_folder(data_dir, name):
    outside = data_dir.parent / "outside.json"
    outside.write_text(json.dumps(_task_json()))  # a valid task file one level up: must not be read
    with pytest.raises(DataError, match="not a plain name|empty task name"):
        load_task(data_dir, name)
    with pytest.raises(DataError, match="not a plain name|empty split name"):
        read_split(data_dir, name)


def test_byte_order_marks_are_not_part_of_names_or_json(data_dir):
    _write(data_dir, "bom", "\ufeff" + json.dumps(_task_json()))
    (data_dir / "splits" / "default" / "train_tasks.txt").write_text("\ufeffbom\n", encoding="utf-8")
    (data_dir / "splits" / "default" / "test_tasks.txt").write_text("")
    assert load_task(data_dir, "bom").definition == "Copy the input."
    assert read_split(data_dir, "default") == ["bom"]


def test_deeply_nested_json_is_a_data_error(data_dir):
    _write(data_dir, "deep", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="deep.json"):
        load_task(data_dir, "deep")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["Instances"][1].update(input=["a", "list"]),
            r"Instances\[1\]: 'input' must be a string, got list",
        ),
        (
            lambda c: c["Instances"][0].update(output=["", "  "]),
            r"Instances\[0\] \(id 't-0'\) has no non-empty reference",
        ),
        (lambda c: c["Instances"][2].update(id={"an": "object"}), r"Instances\[2\]: 'id' must be a string, got dict"),
        (lambda c: c["Positive Examples"][0].update(input={"x": 1}), r"Positive Examples\[0\]: 'input' must be a str"),
        (lambda c: c["Positive Examples"][0].update(output=None), r"Positive Examples\[0\] has a null 'output'"),
        (lambda c: c["Instances"][1].update(input=float("nan")), r"Instances\[1\] has nan as its 'input' \(a missing"),
        (lambda c: c["Instances"][1].update(id=float("inf")), r"Instances\[1\] has inf as its 'id'"),
    ],
    ids=["list-input", "empty-references", "object-id", "object-demo", "null-demo", "nan-input", "inf-id"],
)
def test_values_that_are_not_text_are_named_not_stringified(data_dir, change, message):
    content = _task_json()
    change(content)
    _write(data_dir, "bad", content)
    with pytest.raises(DataError, match=message):
        load_task(data_dir, "bad")


def test_numbers_are_text(data_dir):
    content = _task_json()
    content["Instances"][0].update(id=7, input=12.5, output=["3"])
    _write(data_dir, "numbers", content)
    assert load_task(data_dir, "numbers").instances[0] == {"id": "7", "input": "12.5", "output": ["3"]}


def test_a_fifo_or_folder_in_place_of_a_task_or_split_file_is_named(data_dir):
    """Never opened (a FIFO would block the reader), never called "not found" (it is there)."""
    import os

    os.mkfifo(data_dir / "tasks" / "fifo.json")
    (data_dir / "tasks" / "folder.json").mkdir()
    with pytest.raises(DataError, match=r"fifo.json is a FIFO \(named pipe\), not a task file"):
        load_task(data_dir, "fifo")
    with pytest.raises(DataError, match="folder.json is a folder, not a task file"):
        load_task(data_dir, "folder")
    split = data_dir / "splits" / "default" / "train_tasks.txt"  # (none yet)
    os.mkfifo(split)
    with pytest.raises(DataError, match=r"train_tasks.txt is a FIFO \(named pipe\), not a split file"):
        read_split(data_dir, "default")
