"""Adapter configs: defaults, scales, JSON round trip, and clear errors for sizes that cannot be built."""

from __future__ import annotations

import json

import pytest

from orchmoe import (
    METHODS,
    ConfigError,
    LoraConfig,
    MHRConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    PolyConfig,
    config_from_dict,
)

ALL = [
    LoraConfig(rank=4, alpha=16, target_modules=["q_proj"]),
    MoLoRAConfig(top_k=2, shared_down=True),
    PolyConfig(n_tasks=5),
    MHRConfig(n_tasks=2, n_splits=4),
    MoDEConfig(n_skills=6, rank=4, expert_rank=2),
    OrchMoEConfig(n_abstract_tasks=8, task_router_hidden=16, target_modules=r".*\.q"),
]


def test_method_registry():
    assert sorted(METHODS) == ["lora", "mhr", "mode", "molora", "orchmoe", "poly"]
    assert PolyConfig().needs_task_ids and MHRConfig().needs_task_ids and not OrchMoEConfig().needs_task_ids
    assert [METHODS[m].routing for m in ("lora", "poly", "orchmoe", "molora", "mode")] == [
        "none",
        "task_ids",
        "prompt",
        "tokens",
        "tokens",
    ]
    assert MoDEConfig().shares_down_projection and MoLoRAConfig(shared_down=True).shares_down_projection
    assert not PolyConfig().shares_down_projection and MHRConfig().n_splits == 8 and OrchMoEConfig().n_splits == 1


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.method)
def test_json_round_trip(cfg):
    d = json.loads(cfg.to_json())
    assert d["method"] == cfg.method
    back = config_from_dict(d)
    assert back.to_dict() == cfg.to_dict() and back.scale == cfg.scale
    assert d["alpha"] == cfg.scale * cfg.rank  # the resolved scale is saved, never a default


def test_one_scale_convention_for_every_method():
    """alpha defaults to the rank for every method (scale 1, PEFT's LoRA default); the Poly references'
    1/r is alpha=1."""
    assert LoraConfig(rank=4).scale == 1.0 and LoraConfig(rank=4, alpha=16).scale == 4.0
    assert all(METHODS[m]().scale == 1.0 for m in METHODS)
    assert PolyConfig(rank=2, alpha=1).scale == 0.5 and MHRConfig(rank=4, alpha=1).scale == 0.25
    assert MoDEConfig(rank=6, expert_rank=2).n_blocks == 3
    assert LoraConfig(target_modules=("q", "v")).target_modules == ["q", "v"]


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: MoDEConfig(rank=4, expert_rank=3), r"expert_rank \(p=3\) must divide rank \(r=4\)"),
        (lambda: MoDEConfig(n_skills=0), "n_skills must be >= 1"),
        (lambda: MoLoRAConfig(n_skills=4, top_k=5), r"top_k must be in \[1, n_skills=4\], got 5"),
        (lambda: MoLoRAConfig(top_k=0), "top_k must be in"),
        (lambda: MoLoRAConfig(aux_loss_coef=-1), "aux_loss_coef must be >= 0"),
        (lambda: LoraConfig(rank=0), "rank must be a positive integer, got 0"),
        (lambda: LoraConfig(rank=2.5), "rank must be an integer, got 2.5"),
        (lambda: PolyConfig(n_skills="3"), "n_skills must be an integer, got '3'"),
        (lambda: PolyConfig(n_skills=None), "n_skills must not be null"),
        (lambda: PolyConfig(n_skills=True), "n_skills must be an integer, got True"),
        (lambda: LoraConfig(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: LoraConfig(alpha=0), "alpha must be > 0"),
        (lambda: LoraConfig(target_modules=[]), "target_modules is empty"),
        (lambda: MoLoRAConfig(shared_down="yes"), "shared_down must be true or false"),
        (lambda: LoraConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: LoraConfig(target_modules=3), "target_modules must be a list of names or a regex"),
        (lambda: PolyConfig(n_tasks=0), "n_tasks must be >= 1"),
        (lambda: MHRConfig(n_splits=0), "n_splits must be >= 1"),
        (lambda: OrchMoEConfig(n_abstract_tasks=0), "n_abstract_tasks must be >= 1"),
        (lambda: OrchMoEConfig(task_temperature=0), "task_temperature must be > 0"),
        (lambda: OrchMoEConfig(balance_coef=-0.1), "balance_coef must be >= 0"),
        (lambda: OrchMoEConfig(task_router_hidden=-1), "task_router_hidden must be >= 0"),
        (
            lambda: OrchMoEConfig(prompt_norm="batch"),
            r"prompt_norm must be one of \('standardize', 'layernorm', 'none'\), got 'batch'",
        ),
        (lambda: LoraConfig().replace(rank=-2), "rank must be a positive integer"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_sizes_are_clear_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_adapters_saved_with_normalize_prompt_keep_their_routing():
    assert config_from_dict({"method": "orchmoe", "normalize_prompt": True}).prompt_norm == "layernorm"
    assert config_from_dict({"method": "orchmoe", "normalize_prompt": False}).prompt_norm == "none"
    assert OrchMoEConfig().prompt_norm == "standardize"


def test_config_from_dict_errors():
    with pytest.raises(ConfigError, match=r"unknown method 'moe'; choose one of \['lora', 'mhr'"):
        config_from_dict({"method": "moe"})
    with pytest.raises(ConfigError, match="unknown method None"):
        config_from_dict({"rank": 2})
    with pytest.raises(ConfigError, match=r"PolyConfig has no field\(s\) \['n_expert'\]"):
        config_from_dict({"method": "poly", "n_expert": 3})
