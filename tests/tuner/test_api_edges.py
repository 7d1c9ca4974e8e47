"""Small API edges of issue 10 (item 11): a batch of prompts is no single routing to export, and
`orchmoe report` warns when the runs were scored on different tasks."""

from __future__ import annotations

import json

import pytest
import torch

from core_helpers import tiny_base
from orchmoe import OrchMoEConfig, RoutingError, get_model
from orchmoe.cli import main


def test_export_by_a_batch_of_two_prompts_is_an_error(tmp_path):
    model = get_model(tiny_base("llama"), OrchMoEConfig(n_skills=2, rank=2, n_abstract_tasks=3))
    with pytest.raises(RoutingError, match="export routes by one prompt; got a batch of 2"):
        model.export_peft_lora(tmp_path / "x", input_ids=torch.randint(3, 60, (2, 5)))
    assert not (tmp_path / "x").exists()
    model.export_peft_lora(tmp_path / "y", input_ids=torch.randint(3, 60, (1, 5)))  # one prompt, batched or not
    assert (tmp_path / "y" / "adapter_model.safetensors").is_file()


def _fake_run(path, seen_tasks):
    path.mkdir(parents=True)
    per_task = {t: {"rougeL": 10.0, "n": 1} for t in seen_tasks}
    metrics = {
        "method": "lora",
        "base_model": "tiny",
        "trainable_parameters": 10,
        "train_seconds": 1.0,
        "seen": {"overall": {"rougeL": 10.0, "n": len(seen_tasks)}, "per_task": per_task, "per_category": {}},
        "unseen": {"overall": {"rougeL": 5.0, "n": 1}, "per_task": {"u": {"rougeL": 5.0}}, "per_category": {}},
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_report_warns_when_runs_used_different_tasks(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "a", ["t1", "t2"]), _fake_run(tmp_path / "b", ["t1", "t3"])
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"**Warning**: the runs were scored on different seen tasks ({b} differ from {a})" in out
    assert "different unseen tasks" not in out
    c = _fake_run(tmp_path / "c", ["t1", "t2"])
    assert main(["report", str(a), str(c)]) == 0
    assert "Warning" not in capsys.readouterr().out


def test_an_empty_prompt_and_task_ids_that_are_not_numbers_are_routing_errors():
    """Named by orchmoe before the model meets them (a reshape error deep in attention, a raw TypeError)."""
    from orchmoe import PolyConfig

    model = get_model(tiny_base("llama"), OrchMoEConfig(n_skills=2, rank=2, n_abstract_tasks=3))
    with pytest.raises(RoutingError, match=r"the prompt is empty or not a batch: input shape \(1, 0\)"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    poly = get_model(tiny_base("llama"), PolyConfig(n_tasks=3, n_skills=2, rank=2))
    for bad in ("0", ["a", "b"], [[0], [1, 2]]):
        with pytest.raises(RoutingError, match="task_ids must be integers"):
            poly.generate(input_ids=torch.ones(2, 3, dtype=torch.long), task_ids=bad, max_new_tokens=1)
