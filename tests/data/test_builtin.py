"""The embedded builtin dataset: valid SuperNI files, correct answers, determinism, safe caching."""

from __future__ import annotations

import json
import re
import string

import pytest

from orchmoe.data import (
    BUILTIN_TASKS,
    DataError,
    builtin_data_dir,
    builtin_task_names,
    generate_task,
    load_multitask,
    load_task,
    read_split,
    write_builtin,
)
from orchmoe.data.builtin import BuiltinTaskSpec


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return write_builtin(tmp_path_factory.mktemp("cache") / "builtin", seed=0, n_instances=1200)


def test_layout_and_splits(builtin_dir):
    names = builtin_task_names()
    assert len(names) >= 14 and len(set(names)) == len(names)
    assert sorted(p.stem for p in (builtin_dir / "tasks").glob("*.json")) == sorted(names)
    train = read_split(builtin_dir, "default", "train")
    test = read_split(builtin_dir, "default", "test")
    assert 2 <= len(test) <= 3 and not set(train) & set(test)
    assert sorted(train + test) == sorted(names)
    stamp = json.loads((builtin_dir / "VERSION").read_text())
    assert stamp["seed"] == 0 and stamp["n_instances"] == 1200 and len(stamp["sha256"]) == 64
    # held-out tasks share a category with some training task (so unseen-task transfer is meaningful)
    train_cats = {load_task(builtin_dir, n).category for n in train}
    assert all(load_task(builtin_dir, n).category in train_cats for n in test)


def test_every_task_is_valid_superni(builtin_dir):
    categories = set()
    for name in builtin_task_names():
        raw = json.loads((builtin_dir / "tasks" / f"{name}.json").read_text())
        for key in (
            "Definition",
            "Positive Examples",
            "Negative Examples",
            "Categories",
            "Input_language",
            "Output_language",
            "Instance License",
            "Source",
            "Instances",
        ):
            assert key in raw, (name, key)
        assert raw["Input_language"] == raw["Output_language"] == ["English"]
        assert raw["Instance License"] == ["Apache 2.0"] and raw["Source"] == ["orchmoe builtin"]
        task = load_task(builtin_dir, name)
        categories.add(task.category)
        assert len(task.instances) == 1200 and task.definition
        assert len(task.positive_examples) >= 3
        assert all(ex["explanation"] for ex in task.positive_examples)
        inputs = [i["input"] for i in task.instances]
        assert len(set(inputs)) == len(inputs), f"{name}: duplicate inputs"
        assert len({i["id"] for i in task.instances}) == 1200
        assert not {ex["input"] for ex in task.positive_examples} & set(inputs), f"{name}: demo leaks"
        # short sequences for a small model on CPU
        assert max(len(i.split()) for i in inputs) <= 25, name
        assert max(len(i["output"][0].split()) for i in task.instances) <= 6, name
    assert {
        "Text Manipulation",
        "Arithmetic",
        "Sorting",
        "Counting",
        "Information Extraction",
        "Sentiment Analysis",
        "Classification",
    } <= categories


# Independent re-implementations of every task's answer, from the input text alone.
def _acronym(s):
    return "".join(w[0] for w in s.split()).upper()


def _extract_year(s):
    (year,) = re.findall(r"\b\d{4}\b", s)
    return year


def _count_letter(s):
    m = re.fullmatch(r"Word: (\w+)\. Letter: (\w)", s)
    return str(m.group(1).count(m.group(2)))


def _arith(s):
    a, op, b = s.split()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


def _numbers(s):
    return [int(x) for x in s.split(", ")]


CHECKS = {
    "builtin_reverse_word": lambda s: s[::-1],
    "builtin_uppercase": str.upper,
    "builtin_acronym": _acronym,
    "builtin_duplicate_word": lambda s: f"{s} {s}",
    "builtin_remove_vowels": lambda s: s.translate(str.maketrans("", "", "aeiouAEIOU")),
    "builtin_add": _arith,
    "builtin_subtract": _arith,
    "builtin_multiply_small": _arith,
    "builtin_max_number": lambda s: str(max(_numbers(s))),
    "builtin_sort_numbers": lambda s: ", ".join(str(x) for x in sorted(_numbers(s))),
    "builtin_sort_words": lambda s: " ".join(sorted(s.split())),
    "builtin_count_words": lambda s: str(len(s.split())),
    "builtin_count_letter": _count_letter,
    "builtin_extract_year": _extract_year,
    "builtin_even_odd": lambda s: "even" if int(s) % 2 == 0 else "odd",
}


def test_answers_are_correct(builtin_dir):
    assert set(CHECKS) <= set(builtin_task_names())
    for name, check in CHECKS.items():
        task = load_task(builtin_dir, name)
        for inst in task.instances + [{"input": e["input"], "output": [e["output"]]} for e in task.positive_examples]:
            assert inst["output"] == [check(inst["input"])], (name, inst)


def test_extraction_and_sentiment_answers(builtin_dir):
    for name in ("builtin_extract_city", "builtin_extract_job"):
        for inst in load_task(builtin_dir, name).instances[:300]:
            (answer,) = inst["output"]
            assert re.search(rf"\b{re.escape(answer)}\b", inst["input"]), inst
    city = load_task(builtin_dir, "builtin_extract_city").instances
    job = load_task(builtin_dir, "builtin_extract_job").instances
    # cities are capitalised proper nouns, jobs are lower-case common nouns
    assert all(i["output"][0][0].isupper() for i in city) and all(i["output"][0].islower() for i in job)
    positive_words = {"great", "wonderful", "excellent", "amazing", "lovely", "superb", "perfect"}
    negative_words = {"terrible", "awful", "horrible", "boring", "dreadful", "rude", "dirty"}
    labels = []
    for inst in load_task(builtin_dir, "builtin_sentiment").instances:
        words = set(inst["input"].lower().strip(string.punctuation).replace(",", " ").replace(".", " ").split())
        label = inst["output"][0]
        labels.append(label)
        if words & positive_words:
            assert label == "positive", inst
        if words & negative_words:
            assert label == "negative", inst
    assert 0.4 < labels.count("positive") / len(labels) < 0.6


def test_generation_is_deterministic_per_seed():
    spec = BUILTIN_TASKS[0]
    a = generate_task(spec, seed=0, n_instances=50)
    assert a == generate_task(spec, seed=0, n_instances=50)
    assert a["Instances"] != generate_task(spec, seed=1, n_instances=50)["Instances"]
    # a task's content does not depend on which other tasks exist or on their order
    assert generate_task(BUILTIN_TASKS[3], seed=0, n_instances=20) == generate_task(BUILTIN_TASKS[3], 0, 20)


def test_too_small_input_space_fails_clearly():
    spec = BuiltinTaskSpec("tiny", "Misc.", "Pick.", lambda rng: (str(rng.randint(0, 4)), "x", "e"), "train")
    with pytest.raises(RuntimeError, match="tiny.*too small"):
        generate_task(spec, n_instances=10)


def test_write_is_idempotent_and_rewrites_stale_versions(tmp_path):
    dest = write_builtin(tmp_path / "b", seed=0, n_instances=20)
    f = dest / "tasks" / "builtin_add.json"
    before = (f.stat().st_ino, f.stat().st_mtime_ns)
    assert write_builtin(tmp_path / "b", seed=0, n_instances=20) == dest
    assert (f.stat().st_ino, f.stat().st_mtime_ns) == before  # untouched
    # a different seed (or an old format version) is rewritten in place
    write_builtin(tmp_path / "b", seed=1, n_instances=20)
    assert json.loads((dest / "VERSION").read_text())["seed"] == 1
    assert load_task(dest, "builtin_add").instances != generate_task(BUILTIN_TASKS[5], 0, 20)["Instances"]
    stamp = json.loads((dest / "VERSION").read_text())
    stamp["builtin_version"] = 0
    (dest / "VERSION").write_text(json.dumps(stamp))
    write_builtin(tmp_path / "b", seed=1, n_instances=20)
    assert json.loads((dest / "VERSION").read_text())["builtin_version"] >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary leftovers


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_builtin(tmp_path / "mine", n_instances=10)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_builtin_data_dir_and_env(tmp_path, monkeypatch):
    d = builtin_data_dir(tmp_path / "c1", n_instances=120)
    assert d.parent == (tmp_path / "c1").resolve() and d.name.startswith("builtin-v")
    monkeypatch.setenv("ORCHMOE_CACHE", str(tmp_path / "c2"))
    d2 = builtin_data_dir(n_instances=120)
    assert d2.parent == (tmp_path / "c2").resolve()
    # "builtin" as a data directory goes through the same loader
    data = load_multitask("builtin", 4, n_train=50, n_eval=20, seed=0)
    assert data.data_dir == (tmp_path / "c2" / "builtin-v1").resolve()
    assert len(data.train) == 200 and len(data.unseen) == 100 * len(read_split(data.data_dir, "default", "test"))
