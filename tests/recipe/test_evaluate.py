"""Evaluation: batched generation, routing inputs per method, files written, re-scoring a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchmoe import LoraConfig, OrchMoEConfig, PolyConfig, get_model
from orchmoe.cli import main
from orchmoe.evaluation.evaluate import format_metrics_markdown
from orchmoe.evaluation.generate import generate_predictions
from orchmoe.evaluation.metrics import score_example
from orchmoe.recipe.evaluate import evaluate_run
from orchmoe.recipe.run_data import build_data
from orchmoe.recipe.train import train
from orchmoe.tuner.model import RoutedModel
from orchmoe.utils.markdown import markdown_table
from recipe_helpers import REPO, UNSEEN, save_tiny, tiny_train_config  # noqa: F401

# The tiny run with short targets, small generation batches and a higher learning rate.
OPTIONS = dict(max_target_len=8, eval_batch_size=4, lr=3e-2)


@pytest.fixture(scope="module")
def run(tiny_llama, superni, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "orch"
    train(tiny_train_config(tiny_llama, superni, out, max_steps=6, **OPTIONS))
    return out


def _load(tiny_llama):
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_llama))


def test_run_folder_files_are_consistent(run):
    metrics = json.loads((run / "metrics.json").read_text())
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n_examples"] == 12
    assert {k for p in preds for k in p} == {
        "task",
        "category",
        "seen",
        "id",
        "input",
        "prediction",
        "references",
        "scores",
    }
    for p in preds:  # the per-instance scores are the official ones, and the prompt is not in "input"
        assert p["scores"] == score_example(p["prediction"], p["references"])
        assert "Definition:" not in p["input"] and p["prediction"] == p["prediction"].strip()
        assert p["seen"] == (p["task"] != UNSEEN)
    seen = [p for p in preds if p["seen"]]
    mean_rl = sum(p["scores"]["rougeL"] for p in seen) / len(seen)
    assert metrics["seen"]["overall"]["rougeL"] == pytest.approx(mean_rl)
    assert metrics["method"] == "orchmoe" and metrics["train_steps"] == 6 and metrics["trainable_parameters"] > 0
    md = (run / "metrics.md").read_text()
    assert f"{metrics['seen']['overall']['rougeL']:.2f}" in md and "### Per category" in md and UNSEEN in md


def test_evaluate_run_reproduces_the_training_scores(run):
    before = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    after = evaluate_run(run, progress=False, print_table=False)
    assert (run / "metrics.json").is_file()
    for part in ("overall", "seen", "unseen"):
        want = before[part] if part == "overall" else before[part]["overall"]
        got = after[part] if part == "overall" else after[part]["overall"]
        assert got == pytest.approx(want)


def test_eval_scores_other_data_beside_the_runs_own_metrics(run, shared_superni, capsys):
    """New unseen tasks from other data: scored into eval-<name>/, the run's own metrics untouched; again only
    with --overwrite."""
    own = (run / "metrics.json").read_bytes()
    tasks = "task1195_disflqa_disfluent_to_fluent_conversion,task393_plausible_result_generation"
    argv = [
        "eval",
        str(run),
        "--data",
        str(shared_superni),
        "--tasks",
        tasks,
        "--unseen-per-task",
        "3",
        "--name",
        "new",
        "--no-progress",
    ]
    assert main(argv) == 0
    metrics = json.loads((run / "eval-new" / "metrics.json").read_text())
    assert set(metrics["unseen"]["per_task"]) == set(tasks.split(",")) and metrics["unseen"]["overall"]["n"] == 6
    assert "seen" not in metrics and (run / "metrics.json").read_bytes() == own
    assert main(argv) == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_batched_left_padded_generation_equals_one_by_one(tiny_llama, superni, tmp_path):
    model, tok, _ = _load(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: outputs that really depend on each prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    routed = get_model(model, LoraConfig(rank=4))
    for layer in routed.routed_layers.values():  # a non-trivial adapter
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    data = build_data(tiny_train_config(tiny_llama, superni, tmp_path, **OPTIONS).data, 0)
    examples = data.eval + data.unseen
    kw = dict(n_pos=1, max_source_len=96, max_new_tokens=6, progress=False)
    batched = generate_predictions(routed, tok, examples, data.task_defs, batch_size=5, **kw)
    single = generate_predictions(routed, tok, examples, data.task_defs, batch_size=1, **kw)
    assert len(set(batched)) > len(examples) // 2  # not one degenerate string for every prompt
    assert batched == single


def test_poly_gets_task_ids_and_minus_one_for_unseen(tiny_llama, superni, tmp_path, monkeypatch):
    model, tok, _ = _load(tiny_llama)
    data = build_data(tiny_train_config(tiny_llama, superni, tmp_path, **OPTIONS).data, 0)
    routed = get_model(model, PolyConfig(n_tasks=data.num_tasks))
    seen_ids = []
    real = RoutedModel.generate

    def spy(self, *args, **kw):
        task_ids = kw.get("task_ids")
        seen_ids.append(None if task_ids is None else task_ids.tolist())
        return real(self, *args, **kw)

    monkeypatch.setattr(RoutedModel, "generate", spy)
    examples = data.eval + data.unseen
    generate_predictions(routed, tok, examples, data.task_defs, batch_size=100, max_new_tokens=2, progress=False)
    got = sorted(seen_ids[0])
    want = sorted(data.task_to_id[e.task] if e.seen else -1 for e in examples)
    assert got == want and got.count(-1) == 3

    seen_ids.clear()  # OrchMoE routes from the prompt alone: no task id is handed over
    orch = get_model(_load(tiny_llama)[0], OrchMoEConfig(n_abstract_tasks=4))
    generate_predictions(orch, tok, examples, data.task_defs, batch_size=100, max_new_tokens=2, progress=False)
    assert seen_ids == [None]


def test_markdown_tables():
    table = markdown_table(["name", "score"], [["a|b", 1.234], ["c", None]])
    assert table.splitlines() == ["| name | score |", "| :--- | ---: |", "| a\\|b | 1.23 |", "| c | - |"]
    row = {"n": 2, "rougeL": 50.0, "rougeLsum": 55.0, "rouge1": 60.0, "exact_match": 0.0}
    metrics = {
        "run": "r",
        "method": "lora",
        "base_model": "m",
        "overall": row,
        "seen": {"overall": row, "per_category": {"Cat": row}, "per_task": {"t": row}},
        "categories": {"t": "Cat"},
    }
    md = format_metrics_markdown(metrics)
    assert "| split | n | ROUGE-L | ROUGE-Lsum | ROUGE-1 | EM |" in md
    assert "| seen tasks (held-out instances) | 2 | 50.00 | 55.00 | 60.00 | 0.00 |" in md
    assert "| t | Cat | seen | 2 | 50.00 | 55.00 | 60.00 | 0.00 |" in md and "unseen" not in md
