"""Tokenised features through ``datasets.Dataset.map``: the values of ``encode_example``, cached on disk
and reused by a second call and by another process, invalidated by any change of data, tokenizer or setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.data import (
    default_features_dir,
    encode_example,
    encode_prompt,
    load_multitask,
    pad_batch,
    tokenized_features,
    tokenizer_fingerprint,
)

REPO = Path(__file__).resolve().parents[2]


def write_data(path: Path) -> Path:
    rows = []
    for t, word in (("reverse", "Reverse the word."), ("upper", "Write the word in capitals.")):
        demos = [{"input": "hello world", "output": "dlrow olleh", "explanation": "reversed"}]
        rows += [
            {
                "task_name": t,
                "id": f"{t}-{i}",
                "definition": word,
                "inputs": f"the quick brown fox {i}",
                "targets": f"answer {i}",
                "positive_examples": demos,
            }
            for i in range(12)
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_multitask(
        write_data(tmp_path_factory.mktemp("d") / "ni.jsonl"), 2, n_train=8, n_eval=3, n_unseen_tasks=0
    )


@pytest.fixture()
def counted(monkeypatch):
    """Counts every call of a fast tokenizer (the class method, so every instance is seen)."""
    calls = []
    original = transformers.PreTrainedTokenizerFast.__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "__call__", counting)
    return calls


SETTINGS = {"n_pos": 1, "max_source_len": 48, "max_target_len": 8, "decoder_only": True, "chat_template": False}


def test_features_equal_encode_example(data, tmp_path):
    tok = make_tiny_tokenizer()
    for decoder_only in (True, False):
        settings = dict(SETTINGS, decoder_only=decoder_only)
        feats = tokenized_features(data, tok, cache_dir=tmp_path, **settings)
        assert feats.column_names == ["input_ids", "attention_mask", "labels", "task_id"]
        assert len(feats) == len(data.train) == 16
        for ex, row in zip(data.train, feats):
            want = encode_example(tok, data.task_defs[ex.task], ex.input, ex.target, **settings)
            assert {k: row[k] for k in want} == want and row["task_id"] == ex.task_id
    batch = pad_batch([feats[i] for i in range(4)], pad_id=0, decoder_only=False)
    assert batch["task_ids"].tolist() == [data.train[i].task_id for i in range(4)]
    prompts = tokenized_features(data, tok, cache_dir=tmp_path, part="eval", prompt_only=True, **SETTINGS)
    s = {k: v for k, v in SETTINGS.items() if k != "max_target_len"}
    assert prompts.column_names == ["input_ids", "attention_mask", "task_id"]
    assert prompts["input_ids"] == [encode_prompt(tok, data.task_defs[e.task], e.input, **s) for e in data.eval]


def test_second_call_reads_the_cache_and_any_setting_invalidates_it(data, tmp_path, counted):
    tok = make_tiny_tokenizer(chat_template=True)
    first = tokenized_features(data, tok, cache_dir=tmp_path, **SETTINGS)
    assert len(counted) > len(data.train)  # every example was tokenised (prompt + answer at least)
    files = sorted(p.name for p in tmp_path.glob("*.arrow"))
    assert len(files) == 1
    counted.clear()
    second = tokenized_features(data, tok, cache_dir=tmp_path, **SETTINGS)
    assert counted == [] and second.to_list() == first.to_list()
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == files
    changes = {
        "n_pos": 0,
        "max_source_len": 40,
        "max_target_len": 4,
        "decoder_only": False,
        "chat_template": True,
        "definition": False,
    }
    for key, value in changes.items():
        counted.clear()
        tokenized_features(data, tok, cache_dir=tmp_path, **dict(SETTINGS, **{key: value}))
        assert counted, f"changing {key} reused the cache"
    assert len(list(tmp_path.glob("*.arrow"))) == 1 + len(changes)


def test_other_data_or_tokenizer_is_another_cache_entry(data, tmp_path, counted):
    tok = make_tiny_tokenizer()
    tokenized_features(data, tok, cache_dir=tmp_path, **SETTINGS)
    counted.clear()
    resampled = load_multitask(data.data_dir, 2, n_train=8, n_eval=3, n_unseen_tasks=0, seed=1)
    tokenized_features(resampled, tok, cache_dir=tmp_path, **SETTINGS)
    assert counted
    counted.clear()
    bos = make_tiny_tokenizer(add_bos=True)
    assert tokenizer_fingerprint(bos) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(make_tiny_tokenizer()) == tokenizer_fingerprint(tok)
    feats = tokenized_features(data, bos, cache_dir=tmp_path, **SETTINGS)
    assert counted and feats[0]["input_ids"][0] == bos.bos_token_id


def test_num_proc_gives_the_same_rows_and_its_shards_are_reused(data, tmp_path, counted):
    tok = make_tiny_tokenizer()
    serial = tokenized_features(data, tok, cache_dir=tmp_path / "one", **SETTINGS)
    parallel = tokenized_features(data, tok, cache_dir=tmp_path / "two", num_proc=2, **SETTINGS)
    assert parallel.to_list() == serial.to_list()
    assert len(list((tmp_path / "two").glob("*_of_00002.arrow"))) == 2
    counted.clear()
    again = tokenized_features(data, tok, cache_dir=tmp_path / "two", **SETTINGS)  # num_proc=1 finds the shards
    assert counted == [] and again.to_list() == serial.to_list()


def test_another_process_reuses_the_cache(data, tmp_path):
    tok_dir = tmp_path / "tok"
    make_tiny_tokenizer().save_pretrained(str(tok_dir))
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tokenized_features(data, tok, cache_dir=tmp_path / "feats", **SETTINGS)
    script = textwrap.dedent(f"""
        import json, transformers
        from orchmoe.data import load_multitask, tokenized_features
        calls = []
        original = transformers.PreTrainedTokenizerFast.__call__
        def counting(self, *a, **k):
            calls.append(1)
            return original(self, *a, **k)
        transformers.PreTrainedTokenizerFast.__call__ = counting
        data = load_multitask({str(data.data_dir)!r}, 2, n_train=8, n_eval=3, n_unseen_tasks=0,
                              cache_dir={str(tmp_path / "hf")!r})
        tok = transformers.AutoTokenizer.from_pretrained({str(tok_dir)!r})
        feats = tokenized_features(data, tok, cache_dir={str(tmp_path / "feats")!r}, **{SETTINGS!r})
        print(json.dumps({{"calls": len(calls), "rows": len(feats)}}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"calls": 0, "rows": len(data.train)}


def test_default_cache_dir_follows_orchmoe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHMOE_CACHE", str(tmp_path / "c"))
    assert default_features_dir() == tmp_path / "c" / "features"
    monkeypatch.delenv("ORCHMOE_CACHE")
    assert default_features_dir() == Path.home() / ".cache" / "orchmoe" / "features"


def test_without_datasets_the_same_rows_are_computed_in_memory(data, tmp_path, monkeypatch):
    """`datasets` is optional on the training path (the GPU image lacks it): the same rows, nothing on disk."""
    tok = make_tiny_tokenizer()
    cached = tokenized_features(data, tok, cache_dir=tmp_path / "with", **SETTINGS).to_list()
    prompts = tokenized_features(data, tok, cache_dir=tmp_path / "with", part="eval", prompt_only=True, **SETTINGS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    rows = tokenized_features(data, tok, cache_dir=tmp_path / "without", **SETTINGS)
    assert type(rows).__name__ == "FeatureRows" and rows.to_list() == cached
    assert rows.column_names == ["input_ids", "attention_mask", "labels", "task_id"]
    assert pad_batch(rows[:2], tok.pad_token_id)["input_ids"].shape[0] == 2
    evals = tokenized_features(data, tok, cache_dir=tmp_path / "without", part="eval", prompt_only=True, **SETTINGS)
    assert evals.to_list() == prompts.to_list() and "labels" not in evals.column_names
    assert not (tmp_path / "without").exists()


# Makes `import NAME` fail for the packages the GPU image lacks, as they are absent there.
# As on an image without them: `import datasets` fails and importlib.util.find_spec("datasets") is None (how
# transformers asks whether a package is there), which a None entry in sys.modules gives both.
BLOCKER = """
import sys
for name in ("datasets", "dill", "multiprocess", "trl", "gguf"):
    sys.modules[name] = None
"""


def test_orchmoe_train_runs_without_datasets(tiny_llama, superni, tmp_path):
    """A tiny `orchmoe train` (training, checkpoint, evaluation) in a process where datasets, dill,
    multiprocess, trl and gguf cannot be imported, as on the GPU image."""
    from recipe_helpers import tiny_train_argv

    argv = tiny_train_argv(tiny_llama, superni, tmp_path / "run", max_steps=2, checkpoint_every=1)
    script = BLOCKER + f"from orchmoe.cli import main\nraise SystemExit(main({argv!r}))\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), ORCHMOE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["seen"]["overall"]["n"] > 0 and (tmp_path / "run" / "adapter").is_dir()
    assert not (tmp_path / "cache" / "features").exists()  # tokenised in memory
