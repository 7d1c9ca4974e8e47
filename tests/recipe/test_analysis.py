"""Tests for orchmoe.analysis: NMI/purity, allocation matrices, task assignment, plots, run analysis."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from transformers import LlamaConfig, LlamaForCausalLM

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe import LoraConfig, MHRConfig, OrchMoEConfig, PolyConfig, get_model, save_adapter
from orchmoe.recipe.analysis import (
    AnalysisError,
    abstract_task_assignment,
    allocation_matrices,
    analyze_run,
    category_agreement,
    cluster_tasks,
    normalized_mutual_info,
    plot_allocation_heatmaps,
    plot_dendrogram,
    plot_score_vs_params,
    plot_task_heatmap,
    purity,
    read_run,
    redundancy_table,
    task_skill_profile,
)
from orchmoe.recipe.run_folder import RunFolder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_llama(vocab_size: int = 64, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def randomize_logits(model, seed: int = 0) -> None:
    """Spread the routing logits so allocations differ from the near-uniform initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logits in model.router.allocation_parameters():
            logits.copy_(torch.randn(logits.shape, generator=g) * 2)
        if model.task_router is not None:
            for p in model.task_router.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


# ---------------------------------------------------------------------------------- NMI, purity


def test_nmi_identical_partitions_is_one_whatever_the_names():
    assert normalized_mutual_info([0, 0, 1, 1, 2], [0, 0, 1, 1, 2]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 0, 1, 1, 2], ["b", "b", "a", "a", "c"]) == pytest.approx(1.0)


def test_nmi_independent_partitions_is_zero():
    # every (a, b) pair occurs once: p(a, b) = p(a) p(b), so I = 0
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0


def test_nmi_worked_2x2_example():
    # a = [0,0,1,1], b = [0,0,0,1]: joint p = {(0,0): 1/2, (1,0): 1/4, (1,1): 1/4}, p(a) = (1/2, 1/2),
    # p(b) = (3/4, 1/4). I = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2; H(a) = ln 2;
    # H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4); NMI = I / ((H(a) + H(b)) / 2) ~= 0.3437
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    ha = math.log(2)
    hb = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((ha + hb) / 2)
    assert expected == pytest.approx(0.34371, abs=1e-5)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected, rel=1e-12)
    assert normalized_mutual_info([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(expected, rel=1e-12)  # symmetric


def test_nmi_refinement_example():
    # b splits a's second cluster in two: I = H(a) = ln 2, H(b) = 1.5 ln 2, NMI = ln2 / (1.25 ln 2) = 0.8
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8, rel=1e-12)


def test_nmi_limit_cases_follow_sklearn():
    assert normalized_mutual_info([3, 3, 3], ["x", "x", "x"]) == 1.0  # both unsplit: a perfect match
    assert normalized_mutual_info([0, 0, 0, 0], [0, 1, 0, 1]) == 0.0  # one unsplit: no information
    with pytest.raises(ValueError, match="different lengths"):
        normalized_mutual_info([0, 1], [0])


def test_purity_and_category_agreement():
    assert purity([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]) == pytest.approx(4 / 5)
    assert purity([0, 1, 2], ["a", "a", "a"]) == 1.0  # one task per group is trivially pure
    tasks = ["t1", "t2", "t3", "t4", "t5"]
    assignment = dict(zip(tasks, [0, 0, 0, 1, 1]))
    cats = dict(zip(reversed(tasks), ["b", "b", "b", "a", "a"]))  # mapping order must not matter
    out = category_agreement(assignment, cats)
    assert out["purity"] == pytest.approx(4 / 5)
    assert out["inverse_purity"] == pytest.approx(4 / 5)  # category b is split 1 / 2
    assert out["nmi"] == pytest.approx(normalized_mutual_info([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]))
    assert (out["n_tasks"], out["n_groups"], out["n_categories"]) == (5, 2, 2)
    assert 0.0 <= out["nmi_chance"] < out["nmi"]  # permutation baseline, seeded
    assert out["nmi_chance"] == category_agreement(assignment, cats)["nmi_chance"]
    assert "nmi_chance" not in category_agreement(assignment, cats, n_permutations=0)
    with pytest.raises(AnalysisError, match="no category"):
        category_agreement({"t9": 0}, cats)


# ------------------------------------------------------------------------------ allocations


def test_allocation_matrices_orchmoe_poly_mhr_shapes_and_row_sums():
    orch = get_model(tiny_llama(), OrchMoEConfig(n_abstract_tasks=3, n_skills=4))
    randomize_logits(orch)
    mats = allocation_matrices(orch)
    assert list(mats) == list(orch.routed_layers) and len(mats) == 4  # q_proj, v_proj x 2 layers
    for m in mats.values():
        assert m.shape == (3, 4)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
        assert (m >= 0).all()
    expected = torch.sigmoid(orch.router.skill_router.logits[0].detach())  # the first layer's W_skill
    np.testing.assert_allclose(mats[next(iter(mats))], (expected / expected.sum(1, keepdim=True)).numpy(), atol=1e-6)

    poly = get_model(tiny_llama(), PolyConfig(n_tasks=5, n_skills=4))
    randomize_logits(poly)
    for i, m in enumerate(allocation_matrices(poly).values()):
        assert m.shape == (5, 4)
        np.testing.assert_allclose(m[2], poly.router.allocation(2)[i, 0].detach().numpy(), atol=1e-6)

    mhr = get_model(tiny_llama(), MHRConfig(n_tasks=5, n_skills=4, n_splits=2))
    randomize_logits(mhr)
    for i, m in enumerate(allocation_matrices(mhr).values()):
        assert m.shape == (5, 4)  # (T, h, S) averaged over h
        np.testing.assert_allclose(m[1], mhr.router.allocation(1)[i].mean(0).detach().numpy(), atol=1e-6)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)

    with pytest.raises(AnalysisError, match="lora adapter has no task-skill allocation"):
        allocation_matrices(get_model(tiny_llama(), LoraConfig(rank=2)))


def _prompts(n_tasks: int = 3, seed: int = 0) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Variable-length prompts; task t draws tokens from its own id range so tasks differ."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in range(n_tasks):
        out[f"task{t}"] = [
            (rng.integers(4 + 20 * t, 24 + 20 * t, size=int(n)).tolist(), [1] * int(n))
            for n in rng.integers(3, 12, size=5)
        ]
    return out


def test_abstract_task_assignment_shapes_probabilities_and_batching():
    model = get_model(tiny_llama(), OrchMoEConfig(n_abstract_tasks=4, n_skills=3))
    randomize_logits(model)
    model.train()
    prompts = _prompts()
    tasks, mean_pi, assignment = abstract_task_assignment(model, prompts, batch_size=2)
    assert model.training  # mode restored
    assert tasks == ["task0", "task1", "task2"]
    assert mean_pi.shape == (3, 4) and assignment.shape == (3,)
    np.testing.assert_allclose(mean_pi.sum(1), 1.0, atol=1e-6)
    assert (mean_pi >= 0).all()
    np.testing.assert_array_equal(assignment, mean_pi.argmax(1))

    # Same result from one padded (ids, mask) tensor pair per task, and from a larger batch size:
    model.eval()
    by_hand = []
    padded = {}
    for t, pairs in prompts.items():
        L = max(len(x) for x, _ in pairs)
        ids = torch.zeros(len(pairs), L, dtype=torch.long)
        mask = torch.zeros(len(pairs), L, dtype=torch.long)
        for i, (x, _) in enumerate(pairs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        padded[t] = (ids, mask)
        with torch.no_grad():
            by_hand.append(
                torch.stack([model.task_probabilities(torch.tensor([x]), None)[0] for x, _ in pairs]).mean(0)
            )
    _, mean_pi2, _ = abstract_task_assignment(model, padded, batch_size=64)
    np.testing.assert_allclose(mean_pi2, mean_pi, atol=1e-6)
    np.testing.assert_allclose(mean_pi, torch.stack(by_hand).numpy(), atol=1e-6)

    with pytest.raises(AnalysisError, match="no Task Router"):
        abstract_task_assignment(get_model(tiny_llama(), PolyConfig(n_tasks=3)), prompts)


def test_task_skill_profile_mixes_layers_and_abstract_rows():
    model = get_model(tiny_llama(), OrchMoEConfig(n_abstract_tasks=4, n_skills=3))
    randomize_logits(model)
    _, mean_pi, _ = abstract_task_assignment(model, _prompts())
    profile = task_skill_profile(model, mean_pi)
    assert profile.shape == (3, 3)
    np.testing.assert_allclose(profile.sum(1), 1.0, atol=1e-6)
    mats = list(allocation_matrices(model).values())
    np.testing.assert_allclose(profile, np.mean([mean_pi @ m for m in mats], axis=0), atol=1e-9)
    # one-hot pi on abstract task k gives that row of the layer-mean allocation
    onehot = np.eye(4)[[2]]
    np.testing.assert_allclose(task_skill_profile(model, onehot)[0], np.mean([m[2] for m in mats], axis=0), atol=1e-9)

    poly = get_model(tiny_llama(), PolyConfig(n_tasks=5, n_skills=4))
    randomize_logits(poly)
    assert task_skill_profile(poly).shape == (5, 4)
    with pytest.raises(AnalysisError, match="does not mix allocation rows"):
        task_skill_profile(model, np.ones((3, 7)) / 7)


# ------------------------------------------------------------------------------------ plots


def test_every_plot_writes_a_png_and_dendrogram_leaves_are_the_tasks(tmp_path):
    rng = np.random.default_rng(0)
    mats = {
        f"model.layers.{i}.self_attn.{n}": rng.dirichlet(np.ones(4), size=3)
        for i in range(10)
        for n in ("q_proj", "v_proj")
    }
    assert_png(plot_allocation_heatmaps(mats, tmp_path / "alloc.png", max_layers=3))
    tasks = [f"task{i:03d}_something" for i in range(8)]
    cats = {t: ["Question Answering", "Sentiment Analysis", "Translation"][i % 3] for i, t in enumerate(tasks)}
    profile = rng.dirichlet(np.ones(4), size=8)
    assert_png(plot_task_heatmap(profile, tasks, cats, tmp_path / "tasks.png"))
    assert_png(
        plot_task_heatmap(
            rng.dirichlet(np.ones(6), size=8),
            tasks,
            [cats[t] for t in tasks],
            tmp_path / "tasks_k.png",
            col_label="abstract task",
            order="category",
        )
    )
    leaves = plot_dendrogram(profile, tasks, cats, tmp_path / "dendro.png")
    assert_png(tmp_path / "dendro.png")
    assert sorted(leaves) == sorted(tasks) and len(leaves) == len(tasks)
    rows = [
        {"method": "LoRA", "trainable_parameters": 1.2e6, "score": 40.1, "label": "r=8"},
        {"method": "LoRA", "trainable_parameters": 4.8e6, "score": 41.0},
        {"method": "OrchMoE", "trainable_parameters": 1.3e6, "score": 43.2},
        {"method": "Poly", "trainable_parameters": 1.25e6, "score": 41.9},
    ]
    assert_png(plot_score_vs_params(rows, tmp_path / "fig2.png"))
    with pytest.raises(AnalysisError, match="missing"):
        plot_score_vs_params([{"method": "x", "score": 1.0}], tmp_path / "bad.png")


def test_cluster_tasks_separates_obvious_groups():
    profile = np.array([[0.9, 0.1, 0.0], [0.85, 0.15, 0.0], [0.0, 0.1, 0.9], [0.05, 0.05, 0.9]])
    labels = cluster_tasks(profile, 2)
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_redundancy_table():
    rows = [
        {"K": 25, "trainable_parameters": 1_000_100, "seen_rougeL": 50.0, "unseen_rougeL": 30.0},
        {"K": 100, "trainable_parameters": 1_000_400, "seen_rougeL": 51.5, "unseen_rougeL": 31.0},
        {"K": 50, "trainable_parameters": 1_000_200, "seen_rougeL": 51.0, "unseen_rougeL": None},
    ]
    table = redundancy_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| K | trainable params | seen ROUGE-L")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["100", "50", "25"]
    assert "| 100 | 1,000,400 | 51.50 | +0.00 | 31.00 | +0.00 |" in table
    assert "| 25 | 1,000,100 | 50.00 | -1.50 | 30.00 | -1.00 |" in table
    assert "| 50 | 1,000,200 | 51.00 | -0.50 | - | - |" in table
    with pytest.raises(AnalysisError, match="no K"):
        redundancy_table([{"seen_rougeL": 1.0}])


# ------------------------------------------------------------------------------ run folders

TASKS = {
    "task001_reverse": ("Text Manipulation", "Reverse the letters of the word."),
    "task002_upper": ("Text Manipulation", "Rewrite the phrase in uppercase letters."),
    "task003_add": ("Arithmetic", "Add the two numbers and write the sum."),
    "task004_sort": ("Arithmetic", "Sort the numbers in ascending order."),
}


def _write_data(root: Path) -> Path:
    (root / "tasks").mkdir(parents=True)
    for i, (name, (cat, definition)) in enumerate(TASKS.items()):
        task = {
            "Definition": [definition],
            "Categories": [cat],
            "Positive Examples": [{"input": f"example {i}", "output": f"answer {i}", "explanation": ""}],
            "Negative Examples": [],
            "Instances": [
                {"id": f"{name}-{k}", "input": f"input {k} of {name}", "output": [f"out {k}"]} for k in range(12)
            ],
        }
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
    return root


def _write_run(root: Path, config, data_dir: Path, randomize: bool = True) -> Path:
    """A run folder as the training recipe writes it: adapter/, config.yaml, metrics.json."""
    tok = make_tiny_tokenizer()
    model_dir = root / "base"
    base = tiny_llama(vocab_size=len(tok))
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    routed = get_model(tiny_llama(vocab_size=len(tok)), config, base_model_name="base")
    if randomize:
        randomize_logits(routed, seed=1)
    names = sorted(TASKS)
    run = root / "run"
    folder = RunFolder(run)
    folder.claim()  # marked as a run folder, as the recipe does
    folder.release()
    save_adapter(
        routed,
        run / "adapter",
        metadata={
            "task_names": names,
            "task_to_id": {t: i for i, t in enumerate(names)},
            "categories": {t: TASKS[t][0] for t in names},
            "data_dir": str(data_dir),
        },
    )
    cfg = {
        "model": str(model_dir),
        "data": str(data_dir),
        "tasks": ",".join(names),
        "train_per_task": 6,
        "eval_per_task": 5,
        "unseen_tasks": "0",
        "n_pos": 1,
        "max_source_len": 96,
        "seed": 0,
        "method": config.method,
    }
    folder.write_config(cfg)
    (run / "metrics.json").write_text(
        json.dumps({"seen": {"overall": {"rougeL": 12.5, "n": 20}}, "unseen": {"overall": {"rougeL": 8.25, "n": 3}}})
    )
    return run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data"))


def test_analyze_run_orchmoe_writes_every_artefact(tmp_path, data_dir):
    run = _write_run(tmp_path, OrchMoEConfig(n_abstract_tasks=3, n_skills=4), data_dir)
    result = analyze_run(run, max_prompts_per_task=5, batch_size=4)
    out = run / "analysis"
    for name in ("allocation_heatmaps.png", "task_skill_heatmap.png", "task_abstract_heatmap.png", "dendrogram.png"):
        assert_png(out / name)
    assert (out / "allocations.npz").is_file()
    saved = json.loads((out / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(result))
    names = sorted(TASKS)
    assert saved["tasks"] == names and saved["method"] == "orchmoe"
    assert set(saved["assignment"]) == set(names) and all(0 <= k < 3 for k in saved["assignment"].values())
    for t in names:
        assert len(saved["mean_pi"][t]) == 3 and sum(saved["mean_pi"][t]) == pytest.approx(1.0, abs=1e-3)
        assert saved["n_prompts"][t] == 5
    assert 0.0 <= saved["category_agreement"]["nmi"] <= 1.0
    assert 0.5 <= saved["category_agreement"]["purity"] <= 1.0
    assert sorted(saved["dendrogram_leaves"]) == names
    assert saved["categories"]["task003_add"] == "Arithmetic"
    assert saved["metrics"] == {"seen.rougeL": 12.5, "unseen.rougeL": 8.25}  # the overall scores, not the counts
    md = (out / "analysis.md").read_text()
    assert "| task | category | abstract task" in md and "NMI" in md
    for t in names:
        assert f"| {t} | {TASKS[t][0]} |" in md


def test_analyze_run_poly_needs_no_prompts(tmp_path, data_dir):
    run = _write_run(tmp_path, PolyConfig(n_tasks=4, n_skills=3), data_dir)
    result = analyze_run(run, out_dir=tmp_path / "out")
    assert_png(tmp_path / "out" / "allocation_heatmaps.png")
    assert_png(tmp_path / "out" / "dendrogram.png")
    assert not (tmp_path / "out" / "task_abstract_heatmap.png").exists()
    assert "assignment" not in result and len(result["task_skill_profile"]) == 4
    assert "routed by task id" in (tmp_path / "out" / "analysis.md").read_text()


def test_analyze_says_so_when_allocations_are_uniform(tmp_path, data_dir):
    """Untrained logits (U(-1e-3, 1e-3)): the analysis states the allocations are indistinguishable from
    uniform and draws no dendrogram of noise."""
    run = _write_run(tmp_path, PolyConfig(n_tasks=4, n_skills=3), data_dir, randomize=False)
    result = analyze_run(run, out_dir=tmp_path / "out")
    assert result["allocations_uniform"] and result["allocation_spread"] < 1e-3
    assert not (tmp_path / "out" / "dendrogram.png").exists() and "dendrogram_leaves" not in result
    assert "indistinguishable from uniform" in (tmp_path / "out" / "analysis.md").read_text()
    trained = analyze_run(
        _write_run(tmp_path / "b", PolyConfig(n_tasks=4, n_skills=3), data_dir), out_dir=tmp_path / "o2"
    )
    assert not trained["allocations_uniform"] and trained["allocation_spread"] > 0.05


def test_analyze_run_errors_name_the_missing_file(tmp_path, data_dir):
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match=r"no adapter_config\.json in .*empty[/\\]adapter"):
        analyze_run(tmp_path / "empty")
    run = _write_run(tmp_path, OrchMoEConfig(n_abstract_tasks=2, n_skills=2), data_dir)
    (run / "config.yaml").unlink()
    with pytest.raises(AnalysisError, match=r"has no config\.yaml"):
        read_run(run)
    meta_file = run / "adapter" / "adapter_config.json"
    meta = json.loads(meta_file.read_text())
    meta["orchmoe"]["metadata"] = {}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AnalysisError, match="task_to_id"):
        read_run(run)


def test_analyze_run_rejects_methods_without_allocation(tmp_path, data_dir):
    run = _write_run(tmp_path, LoraConfig(rank=2), data_dir)
    with pytest.raises(AnalysisError, match="no task-skill allocation"):
        analyze_run(run)


def test_analyze_out_never_writes_over_the_users_files(tmp_path, data_dir):
    run = _write_run(tmp_path, PolyConfig(n_tasks=4, n_skills=3), data_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "analysis.md").write_text("my notes")
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(AnalysisError, match=r"holds files an analysis did not write \(notes\.txt\)"):
        analyze_run(run, out_dir=mine)
    assert (mine / "analysis.md").read_text() == "my notes"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(AnalysisError, match=r"is a FIFO \(named pipe\); name a new or empty folder"):
        analyze_run(run, out_dir=tmp_path / "fifo")
    analyze_run(run, out_dir=tmp_path / "out")
    again = analyze_run(run, out_dir=tmp_path / "out")  # its own earlier analysis is replaced
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == json.loads(json.dumps(again))
