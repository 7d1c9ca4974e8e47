"""A method added through the registry alone: a config dataclass, a router and one registration line, in a module
of its own (here a plug-in file outside the package), then trained, analysed and exported through the command line
with no other change anywhere. Also what the registry itself guarantees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchmoe import METHODS
from orchmoe.core.registry import config_class, register_method, router_class

TESTS = Path(__file__).resolve().parents[1]

#: the whole method: Poly's task-id routing with a plain softmax over skills (no relaxed Bernoulli)
TOY_METHOD = '''
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from orchmoe.core.config import AdapterConfig, option
from orchmoe.core.registry import register_method
from orchmoe.core.routers import ModelRouter, Route


@dataclass
class SoftPolyConfig(AdapterConfig):
    """Task-id routing with a softmax allocation over S skills."""

    method: ClassVar[str] = "softpoly"
    routing: ClassVar[str] = "task_ids"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 3, "rank": 2}
    n_tasks: int = option(1, "training tasks T (set from the data)")
    n_skills: int = option(3, "skills S")
    rank: int = option(2, "rank of each skill")

    @property
    def n_experts(self) -> int:
        return self.n_skills

    def layer_parameters(self, P: int, Q: int) -> int:
        return self.n_skills * self.rank * (P + Q) + self.n_tasks * self.n_skills

    def for_tasks(self, n_tasks, explicit=frozenset()):
        return self.replace(n_tasks=n_tasks)


@register_method(SoftPolyConfig)
class SoftPolyRouter(ModelRouter):
    def __init__(self, n_layers: int, n_tasks: int, n_skills: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(n_layers, n_tasks, n_skills) * 0.5)  # (L, T, S)

    @classmethod
    def from_config(cls, config, n_layers, d_model):
        return cls(n_layers, config.n_tasks, config.n_skills)

    def forward(self, inputs):
        ids = inputs.task_ids.to(self.logits.device)
        rows = self.logits.index_select(1, ids.clamp_min(0)).softmax(-1)  # (L, b, S)
        mean = self.logits.softmax(-1).mean(1, keepdim=True)  # (L, 1, S): an unseen task
        return Route(torch.where((ids < 0).view(1, -1, 1), mean, rows).unsqueeze(2))  # (L, b, 1, S)

    def allocation_parameters(self):
        return [self.logits]

    def allocation_matrices(self):
        return self.logits.softmax(-1)  # (L, T, S)

    def fixed_weights(self, task_id=None, **other):
        rows = self.logits.softmax(-1)
        row = rows.mean(1) if task_id == -1 else rows[:, task_id]  # (L, S)
        return row[:, None, None, :]  # (L, 1, 1, S)
'''

RUNNER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import toy_method  # noqa: F401  (registers the method)
from orchmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _orchmoe(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    return subprocess.run(
        [sys.executable, str(runner), str(tmp_path), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)},
    )


def test_a_toy_method_runs_through_the_cli_analysis_and_export(tiny_llama, superni, tmp_path):
    from recipe_helpers import SMALL_DATA, tiny_train_argv

    run = tmp_path / "run"
    train = _orchmoe(tmp_path, *tiny_train_argv(tiny_llama, superni, run, **SMALL_DATA), "--method", "softpoly",
                     "--n-skills", "2")  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ORCHMOE_SOFTPOLY" and meta["n_skills"] == 2 and meta["n_tasks"] == 3
    assert json.loads((run / "metrics.json").read_text())["seen"]["overall"]["n"] > 0

    analysis = _orchmoe(tmp_path, "analyze", run)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    saved = json.loads((run / "analysis" / "analysis.json").read_text())
    assert saved["method"] == "softpoly" and saved["n_tasks"] == 3 and len(saved["task_skill_profile"]) == 3

    export = _orchmoe(tmp_path, "export", run, "--bundle", tmp_path / "bundle", "--check", "2", "--device", "cpu")
    assert export.returncode == 0, export.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["method"] == "softpoly" and set(manifest["loras"]) == {"task-0", "task-1", "task-2", "task-unseen"}
    assert manifest["agreement"]["answers_equal"] == manifest["agreement"]["prompts"] == 2  # exact for task routing

    helps = _orchmoe(tmp_path, "train", "--method", "softpoly", "--help")
    assert "--n-skills" in helps.stdout and "skills S" in helps.stdout


def test_every_method_is_registered_once_with_its_router():
    assert set(METHODS) >= {"lora", "molora", "poly", "mhr", "mode", "orchmoe"}
    for name, cls in METHODS.items():
        assert config_class(name) is cls and cls.method == name
        small = cls.small(3)
        assert router_class(small).__name__.endswith("Router") and small.small_fields == cls.small_fields
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of"):
        config_class("nope")


def test_a_method_name_cannot_be_taken_twice():
    class Impostor(METHODS["poly"]):
        pass

    with pytest.raises(TypeError, match="already registered to PolyConfig"):
        register_method(Impostor)(type("R", (), {}))
