"""PEFT parity and export: our Poly/MHR/LoRA equal PEFT's given the same weights; an exported
adapter loaded by `peft.PeftModel.from_pretrained` reproduces the routed model for that task;
`merge_and_unload` folds one routing into the base weights."""

from __future__ import annotations

import warnings

import pytest
import torch

from core_helpers import CROSS_PATH, N_TASKS, randomize_adapter, tiny_base
from orchmoe import LoraConfig, MHRConfig, MoDEConfig, MoLoRAConfig, OrchMoEConfig, PolyConfig, RoutingError, get_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def _ids(b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (b, n), generator=g)


def _logits(model, ids, **kw):
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            kw.setdefault("decoder_input_ids", ids[:, :4])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits


# ----------------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("n_splits", [1, 4], ids=["poly", "mhr"])
def test_poly_and_mhr_equal_peft_poly(n_splits):
    cls = PolyConfig if n_splits == 1 else MHRConfig
    # PEFT's Poly scales by 1/r: alpha=1 in our shared alpha/r convention
    ours = get_model(
        tiny_base("llama"), cls(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=n_splits, alpha=1, target_modules=TARGETS)
    )
    randomize_adapter(ours)
    pm = peft.get_peft_model(
        tiny_base("llama"),
        peft.PolyConfig(
            task_type="CAUSAL_LM", r=2, n_tasks=N_TASKS, n_skills=4, n_splits=n_splits, target_modules=TARGETS
        ),
    )
    h = n_splits
    with torch.no_grad():
        for i, (path, layer) in enumerate(ours.routed_layers.items()):
            theirs = pm.base_model.model.get_submodule(path)
            S, P, r = layer.lora_A.shape
            Q = layer.out_features
            # ours A (S, P, r) -> PEFT (h, S, P/h, r); ours B (S, r, Q) -> PEFT (h, S, r, Q/h); logits (T, h*S) both
            theirs.poly_lora_A["default"].copy_(layer.lora_A.view(S, h, P // h, r).permute(1, 0, 2, 3))
            theirs.poly_lora_B["default"].copy_(layer.lora_B.view(S, r, h, Q // h).permute(2, 0, 1, 3))
            theirs.poly_router["default"].module_logits.copy_(ours.router.logits[i])  # (T, h*S) of layer i
    ours.eval(), pm.eval()
    ids, tasks = _ids(), torch.tensor([2, 0, 1])
    a = _logits(ours, ids, task_ids=tasks)
    b = _logits(pm, ids, task_ids=tasks)
    assert not torch.allclose(a, _logits(tiny_base("llama"), ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(a, b, **CROSS_PATH)


def test_lora_equals_peft_lora():
    ours = get_model(tiny_base("llama"), LoraConfig(rank=4, alpha=8, target_modules=TARGETS))
    randomize_adapter(ours)
    pm = peft.get_peft_model(tiny_base("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for path, layer in ours.routed_layers.items():
            theirs = pm.base_model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(layer.lora_A[0].T)  # (r, P)
            theirs.lora_B["default"].weight.copy_(layer.lora_B[0].T)  # (Q, r)
    pm.eval()
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), **CROSS_PATH)


# ----------------------------------------------------------------------------- export to a PEFT LoRA folder
def _routed(arch, cfg):
    model = get_model(tiny_base(arch), cfg)
    randomize_adapter(model)
    return model.eval()


def _orch_onehot(model, k):
    """Make the task router output (numerically exactly) the one-hot abstract task k for every prompt."""
    with torch.no_grad():
        model.task_router.net.weight.zero_()
        model.task_router.net.bias.fill_(-60.0)
        model.task_router.net.bias[k] = 60.0


def _load_peft(arch, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_base(arch), str(folder)).eval()


EXPORT_CASES = {
    "lora": ("llama", LoraConfig(rank=4, alpha=8, target_modules=TARGETS), {}, {}),
    "poly_task": (
        "llama",
        PolyConfig(n_tasks=N_TASKS, n_skills=4, rank=2, target_modules=TARGETS),
        {"task_id": 1},
        {"task_ids": [1, 1, 1]},
    ),
    "mhr_task": (
        "llama",
        MHRConfig(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=4, target_modules=TARGETS),
        {"task_id": 2},
        {"task_ids": [2, 2, 2]},
    ),
    "orchmoe_abstract": (
        "llama",
        OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=3, target_modules=TARGETS),
        {"abstract_task": 2},
        "onehot",
    ),
    "gpt2_conv1d_lora": ("gpt2", LoraConfig(rank=4, target_modules=["c_attn", "c_fc"]), {}, {}),
    "gpt2_conv1d_mhr": (
        "gpt2",
        MHRConfig(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=2, target_modules=["c_attn"]),
        {"task_id": 0},
        {"task_ids": [0, 0, 0]},
    ),
    "t5_poly": (
        "t5",
        PolyConfig(n_tasks=N_TASKS, n_skills=4, rank=2, target_modules=["q", "v", "wo"]),
        {"task_id": 1},
        {"task_ids": [1, 1, 1]},
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_exported_peft_lora_reproduces_task(case, tmp_path):
    arch, cfg, routing, fwd = EXPORT_CASES[case]
    model = _routed(arch, cfg)
    ids = _ids()
    if fwd == "onehot":
        _orch_onehot(model, routing["abstract_task"])
        fwd = {}
    expected = _logits(model, ids, **{k: torch.tensor(v) for k, v in fwd.items()})
    folder = model.export_peft_lora(tmp_path / "peft", **routing)
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    loaded = _load_peft(arch, folder)
    got = _logits(loaded, ids)
    assert not torch.allclose(got, _logits(tiny_base(arch), ids), atol=1e-3)
    torch.testing.assert_close(got, expected, **CROSS_PATH)


def test_exported_orchmoe_prompt_reproduces_that_prompt(tmp_path):
    model = _routed("llama", OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=3, target_modules=TARGETS))
    with torch.no_grad():  # a sharp task router so different prompts really route differently
        model.task_router.net.weight.mul_(20)
    prompt = _ids(1, 9, seed=5)
    expected = _logits(model, prompt)
    loaded = _load_peft("llama", model.export_peft_lora(tmp_path / "p", input_ids=prompt[0]))
    torch.testing.assert_close(_logits(loaded, prompt), expected, **CROSS_PATH)


def test_export_errors(tmp_path):
    poly = _routed("llama", PolyConfig(n_tasks=N_TASKS, n_skills=2, rank=2, target_modules=TARGETS))
    with pytest.raises(RoutingError, match="task_id"):
        poly.export_peft_lora(tmp_path / "a")
    with pytest.raises(RoutingError, match="out of range"):
        poly.export_peft_lora(tmp_path / "a", task_id=N_TASKS)
    orch = _routed("llama", OrchMoEConfig(n_skills=2, rank=2, n_abstract_tasks=3, target_modules=TARGETS))
    with pytest.raises(RoutingError, match="exactly one of"):
        orch.export_peft_lora(tmp_path / "b")
    with pytest.raises(RoutingError, match="abstract task 7 out of range"):
        orch.export_peft_lora(tmp_path / "b", abstract_task=7)
    for cfg in (MoLoRAConfig(target_modules=TARGETS), MoDEConfig(target_modules=TARGETS)):
        with pytest.raises(RoutingError, match="routes every token"):
            _routed("llama", cfg).export_peft_lora(tmp_path / "c")
        with pytest.raises(RoutingError, match="routes every token"):
            _routed("llama", cfg).merge_and_unload()


# ----------------------------------------------------------------------------- merge
MERGE_CASES = {
    "lora_llama": ("llama", LoraConfig(rank=4, target_modules=TARGETS), {}, {}),
    "mhr_llama": (
        "llama",
        MHRConfig(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=4, target_modules=TARGETS),
        {"task_id": 1},
        {"task_ids": [1, 1, 1]},
    ),
    "poly_gpt2_conv1d": (
        "gpt2",
        PolyConfig(n_tasks=N_TASKS, n_skills=4, rank=2, target_modules=["c_attn", "c_proj"]),
        {"task_id": 2},
        {"task_ids": [2, 2, 2]},
    ),
    "orchmoe_t5": (
        "t5",
        OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=3, target_modules=["q", "v"]),
        {"abstract_task": 0},
        "onehot",
    ),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_and_unload_equals_routed_output(case):
    arch, cfg, routing, fwd = MERGE_CASES[case]
    model = _routed(arch, cfg)
    ids = _ids()
    if fwd == "onehot":
        _orch_onehot(model, routing["abstract_task"])
        fwd = {}
    expected = _logits(model, ids, **{k: torch.tensor(v) for k, v in fwd.items()})
    merged = model.merge_and_unload(**routing)
    from orchmoe import RoutedLoraLayer

    assert not any(isinstance(m, RoutedLoraLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, **CROSS_PATH)


def test_an_export_never_deletes_a_users_file_nor_lands_in_the_working_folder(tmp_path, monkeypatch):
    """``overwrite`` replaces an earlier export whole, so a user's file put into it is named, not deleted; an empty
    path is no folder (it would export into the working directory)."""
    from orchmoe.adapters.export import ExportError

    orch = _routed("llama", OrchMoEConfig(n_skills=2, rank=2, n_abstract_tasks=3, target_modules=TARGETS))
    dest = orch.export_peft_lora(tmp_path / "lora", abstract_task=0)
    (dest / "NOTES.md").write_text("mine")
    (dest / "extra").mkdir()
    (dest / "extra" / "x.txt").write_text("mine too")
    with pytest.raises(ExportError, match=r"files no export writes \(NOTES.md, extra/x.txt\)"):
        orch.export_peft_lora(dest, overwrite=True, abstract_task=1)
    assert (dest / "NOTES.md").read_text() == "mine" and (dest / "extra" / "x.txt").is_file()
    (dest / "NOTES.md").unlink()
    (dest / "extra" / "x.txt").unlink()
    (dest / "extra").rmdir()
    assert orch.export_peft_lora(dest, overwrite=True, abstract_task=1) == dest  # an earlier export alone: replaced
    monkeypatch.chdir(tmp_path / "lora")
    for empty in ("", "  "):
        with pytest.raises(ExportError, match="the export folder is empty"):
            orch.export_peft_lora(empty, overwrite=True, abstract_task=0)
