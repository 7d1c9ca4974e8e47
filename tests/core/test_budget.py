"""Parameter accounting (the formulas of docs/methods.md == the real adapter) and budget matching."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from core_helpers import tiny_base
from orchmoe import (
    METHODS,
    BudgetError,
    LoraConfig,
    MHRConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    PolyConfig,
    count_parameters,
    get_model,
    lora_budget,
    match_budget,
)
from orchmoe.core.budget import model_dims

CONFIGS = {
    "lora": LoraConfig(rank=3),
    "molora": MoLoRAConfig(n_skills=4, rank=2, top_k=2),
    "molora_sd": MoLoRAConfig(n_skills=5, rank=3, shared_down=True),
    "poly": PolyConfig(n_tasks=7, n_skills=3, rank=2),
    "mhr": MHRConfig(n_tasks=5, n_skills=2, rank=3, n_splits=4),
    "mode_dyadic": MoDEConfig(n_skills=6, rank=4, expert_rank=1),
    "mode_m_r_p": MoDEConfig(n_skills=3, rank=6, expert_rank=3),
    "orchmoe": OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=5),
    "orchmoe_mlp": OrchMoEConfig(n_skills=3, rank=2, n_abstract_tasks=6, task_router_hidden=7),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "t5": ["q", "v", "wi"]}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("arch", list(TARGETS))
def test_formula_equals_real_adapter_parameters(arch, name):
    cfg = CONFIGS[name].replace(target_modules=TARGETS[arch])
    model = get_model(tiny_base(arch), cfg)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert real == model.num_parameters_split()[0]
    shapes, d = model_dims(tiny_base(arch), cfg.target_modules)
    assert count_parameters(cfg, shapes, d) == real


def test_formulas_by_hand():
    """The per-layer formulas of docs/methods.md, section 5, written out for one (10 -> 6) layer."""
    shapes = {"a": (10, 6)}  # P = 10, Q = 6
    assert count_parameters(LoraConfig(rank=2), shapes, 8) == 2 * 16
    assert count_parameters(MoLoRAConfig(n_skills=3, rank=2), shapes, 8) == 3 * 2 * 16 + 10 * 3
    assert count_parameters(MoLoRAConfig(n_skills=3, rank=2, shared_down=True), shapes, 8) == 2 * 10 + 3 * 2 * 6 + 30
    assert count_parameters(MHRConfig(n_tasks=4, n_skills=3, rank=2, n_splits=2), shapes, 8) == 3 * 2 * 16 + 4 * 2 * 3
    assert count_parameters(MoDEConfig(n_skills=5, rank=4, expert_rank=2), shapes, 8) == 4 * 10 + 5 * 4 * 6 + 2 * 5 * 10
    assert (
        count_parameters(OrchMoEConfig(n_skills=3, rank=2, n_abstract_tasks=4), shapes, 8)
        == 3 * 2 * 16 + 12 + 8 * 4 + 4
    )


# The tiny Llama (q: 32 -> 32, v: 32 -> 16, two layers) at the LoRA r = 8 budget: which size each method takes.
MATCH = [
    ("poly", PolyConfig(n_tasks=3, n_skills=4, rank=1), "rank", 2),
    ("mhr_h2", MHRConfig(n_tasks=3, n_skills=4, rank=1, n_splits=2), "rank", 2),
    ("molora_skills", MoLoRAConfig(n_skills=1, rank=2), "n_skills", 3),
    ("molora_sd_skills", MoLoRAConfig(n_skills=1, rank=2, shared_down=True), "n_skills", 5),
    ("mode_skills", MoDEConfig(n_skills=1, rank=4, expert_rank=2), "n_skills", 2),
    ("orchmoe", OrchMoEConfig(n_skills=4, rank=1, n_abstract_tasks=3), "rank", 2),
    ("lora", LoraConfig(rank=1), "rank", 8),
]


@pytest.mark.parametrize("name,cfg,vary,expected", MATCH, ids=[m[0] for m in MATCH])
def test_match_budget_lands_within_tolerance(name, cfg, vary, expected):
    base = tiny_base("llama")
    budget = lora_budget(base, rank=8)
    assert budget == get_model(tiny_base("llama"), LoraConfig(rank=8)).num_parameters_split()[0] == 1792
    matched = match_budget(cfg, base, budget, vary=vary, tolerance=0.1)
    assert getattr(matched, vary) == expected
    real = get_model(tiny_base("llama"), matched).num_parameters_split()[0]
    assert abs(real - budget) <= 0.1 * budget


def test_match_budget_impossible_is_a_budget_error():
    base = tiny_base("llama")
    budget = lora_budget(base, rank=8)
    # MHR with 4 blocks: rank 1 gives 1088, rank 2 gives 1984 parameters, both > 10% away from 1792
    with pytest.raises(BudgetError, match=r"within 10% by varying rank; the closest is rank=2 with 1,984 parameters"):
        match_budget(MHRConfig(n_tasks=3, n_skills=4, rank=1, n_splits=4), base, budget)
    with pytest.raises(BudgetError, match="MoLoRA|molora"):  # rank steps of 896 parameters
        match_budget(MoLoRAConfig(n_skills=4, rank=1), base, budget)
    with pytest.raises(BudgetError, match="positive number"):
        match_budget(LoraConfig(), base, 0)
    with pytest.raises(BudgetError, match="no field 'experts'"):
        match_budget(LoraConfig(), base, budget, vary="experts")
    with pytest.raises(BudgetError, match="cannot meet a budget of 10"):
        match_budget(OrchMoEConfig(rank=1), base, 10)


# ----------------------------------------------------------------------------- the worked example in the docs
METHODS_DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _doc_table(marker: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table right after ``<!-- worked-example: marker -->``."""
    lines = METHODS_DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- worked-example: {marker} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table after the {marker!r} marker in {METHODS_DOC}"
    return rows[2:]  # header and separator


def _doc_config(cell: str):
    """`PolyConfig(n_tasks=100, ...)` from a table cell: a config class of orchmoe and literal keyword arguments."""
    call = ast.parse(cell.strip("`"), mode="eval").body
    classes = {cls.__name__: cls for cls in METHODS.values()}
    assert isinstance(call, ast.Call) and not call.args and call.func.id in classes, cell
    return classes[call.func.id](**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})


def _number(cell: str) -> int:
    return int(cell.replace(",", ""))


def _smollm2_meta():
    """SmolLM2-135M's architecture on the meta device: its real layer shapes, no weights, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_worked_example_matches_count_parameters():
    """docs/methods.md's SmolLM2-135M tables are what count_parameters and match_budget give (the doc cannot drift)."""
    base = _smollm2_meta()
    shapes, d = model_dims(base)  # the default targets: q_proj and v_proj
    assert d == 576 and len(shapes) == 60
    assert {(k.rsplit(".", 1)[-1], v) for k, v in shapes.items()} == {("q_proj", (576, 576)), ("v_proj", (576, 192))}
    budget = lora_budget(base, rank=8)
    assert budget == 460_800

    counts = _doc_table("counts")
    assert len(counts) >= 6 and {type(_doc_config(r[1])).method for r in counts} == set(METHODS)
    for name, cell, q, v, once, total, ratio in counts:
        cfg = _doc_config(cell)
        assert (cfg.layer_parameters(576, 576), cfg.layer_parameters(576, 192), cfg.model_parameters(576)) == (
            _number(q),
            _number(v),
            _number(once),
        ), name
        assert count_parameters(cfg, shapes, d) == _number(total), name
        assert f"{_number(total) / budget:.3f}" == ratio, name

    matches = _doc_table("match_budget")
    assert any(r[5] == "yes" for r in matches) and any(r[5] == "no" for r in matches)
    for cell, vary, closest, params, off, within in matches:
        start = _doc_config(cell)
        assert f"{(_number(params) - budget) / budget:+.1%}" == off, cell
        if within == "yes":
            got = match_budget(start, base, budget, vary=vary)
            assert getattr(got, vary) == int(closest) and count_parameters(got, shapes, d) == _number(params), cell
        else:
            assert within == "no", cell
            with pytest.raises(BudgetError, match=re.escape(f"closest is {vary}={closest} with {_number(params):,} ")):
                match_budget(start, base, budget, vary=vary)
