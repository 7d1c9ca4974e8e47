"""The multi-LoRA bundle: its LoRAs through PEFT's mixed-adapter batch give orchmoe's hard-routed outputs
(logits within CROSS_PATH, greedy tokens equal), the router picks the same LoRA, soft pi's agreement is
measured, per-token routing is refused, and a failed or refused export leaves nothing behind."""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

from core_helpers import CROSS_PATH, EOS, N_TASKS, PAD, method_config, randomize_adapter, tiny_base
from orchmoe import get_model
from orchmoe.adapters.bundle import (
    BundleError,
    BundleManifest,
    BundleRouter,
    RoutedPrompt,
    lora_name,
    write_bundle,
)
from orchmoe.adapters.export import export_peft_lora
from orchmoe.core.routing import RoutingError
from orchmoe.data import pad_batch

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
TOK = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def _model(method: str, **overrides):
    model = get_model(tiny_base("llama"), method_config(method, TARGETS, **overrides))
    randomize_adapter(model, std=0.5)
    return model.eval()


def _prompts(n: int = 9, seed: int = 0) -> list[RoutedPrompt]:
    """Prompts of different lengths; task ids 0..T-1 and -1 (an unseen task) in turn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 60, (5 + (3 * i) % 7,), generator=g).tolist()
        task_id = i % (N_TASKS + 1) - 1
        out.append(RoutedPrompt(tuple(ids), task=f"t{task_id}", task_id=task_id, split="eval"))
    return out


def _batch(prompts):
    b = pad_batch([{"input_ids": list(p.ids)} for p in prompts], PAD, "left", decoder_only=True)
    return b["input_ids"], b["attention_mask"]


def _peft_bundle(folder):
    """Every LoRA of the bundle loaded by name with PEFT's own API (not orchmoe's helper)."""
    paths = BundleManifest.read(folder).lora_paths()
    names = list(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_base("llama"), str(paths[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(str(paths[name]), adapter_name=name)
    return pm.eval()


def _hard_copy(model):
    """The same OrchMoE adapter with hard routing: every prompt on its argmax abstract task alone."""
    hard = _model("orchmoe", hard_routing=True)
    hard.load_state_dict(model.state_dict())
    return hard.eval()


CASES = {
    "poly": ("poly", {}),
    "mhr": ("mhr", {}),
    "orchmoe_hard": ("orchmoe", {"hard_routing": True}),
    "orchmoe_soft_argmax": ("orchmoe", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bundle_through_peft_mixed_batch_equals_hard_routed_orchmoe(case, tmp_path):
    method, overrides = CASES[case]
    model = _model(method, **overrides)
    prompts = _prompts()
    manifest = write_bundle(model, tmp_path / "bundle", prompts=prompts, check=0)
    reference = _hard_copy(model) if case == "orchmoe_soft_argmax" else model
    ids, mask = _batch(prompts)
    if method == "orchmoe":
        names = BundleRouter.from_folder(tmp_path / "bundle").route(model.get_input_embeddings(), ids, mask)
        ks = model.task_probabilities(ids, mask).argmax(-1).tolist()
        assert names == [lora_name(abstract_task=k) for k in ks]
        extra = {}
    else:
        names = [lora_name(task_id=p.task_id) for p in prompts]
        assert set(manifest["loras"]) == {lora_name(task_id=t) for t in range(-1, N_TASKS)}
        extra = {"task_ids": torch.tensor([p.task_id for p in prompts])}
    assert len(set(names)) >= 2, "the prompts must use several LoRAs for the mixed batch to mean something"
    pm = _peft_bundle(tmp_path / "bundle")
    with torch.no_grad():
        ours = reference(input_ids=ids, attention_mask=mask, **extra).logits
        theirs = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        plain = tiny_base("llama")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - plain)[real].abs().mean() > 1e-2  # the adapters change the outputs
    torch.testing.assert_close(theirs[real], ours[real], **CROSS_PATH)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    a = reference.generate(input_ids=ids, attention_mask=mask, **extra, **gen)
    b = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)
    assert torch.equal(a, b)
    assert manifest["exact"] == (case != "orchmoe_soft_argmax")


def test_lora_bundle_has_one_lora(tmp_path):
    model = _model("lora")
    manifest = write_bundle(model, tmp_path / "b", prompts=_prompts(3), check=0)
    assert list(manifest["loras"]) == ["lora"] and manifest["exact"]
    assert BundleRouter.from_folder(tmp_path / "b").route(tasks=[0, 1]) == ["lora", "lora"]


@pytest.mark.parametrize("method", ["poly", "orchmoe_hard"])
def test_check_of_an_exact_bundle_agrees_everywhere(method, tmp_path):
    model = _model("orchmoe", hard_routing=True) if method == "orchmoe_hard" else _model(method)
    manifest = write_bundle(
        model, tmp_path / "b", tokenizer=TOK, prompts=_prompts(), fresh_base=lambda: tiny_base("llama"), check=6,
        max_new_tokens=5, batch_size=4,
    )  # fmt: skip
    a = manifest["agreement"]
    assert a["prompts"] == 6 and a["answers_equal"] == 6 and a["rate"] == 1.0
    assert a["adapter_changes_answer"] > 0  # the agreement is about answers the adapter decides
    assert "6 of 6" in (tmp_path / "b" / "README.md").read_text()


def test_soft_pi_reports_agreement_and_maps_unused_abstract_tasks(tmp_path):
    model = _model("orchmoe", n_abstract_tasks=6)
    prompts = _prompts(12)
    manifest = write_bundle(
        model, tmp_path / "b", tokenizer=TOK, prompts=prompts, fresh_base=lambda: tiny_base("llama"), check=12,
        max_new_tokens=5,
    )  # fmt: skip
    assert not manifest["exact"] and "soft" in manifest["exactness"]
    a = manifest["agreement"]
    assert a["prompts"] == 12 and 0 <= a["answers_equal"] <= 12 and a["rate"] == a["answers_equal"] / 12
    used = {int(name.split("-")[1]) for name in manifest["loras"]}
    ks = model.task_probabilities(*_batch(prompts)).argmax(-1).tolist()
    assert used == set(ks)
    assert sum(entry["prompts"] for entry in manifest["loras"].values()) == 12
    table = manifest["route"]["abstract_task_to_lora"]
    assert set(table) == {str(k) for k in range(6)} and set(table.values()) <= set(manifest["loras"])
    assert all(table[str(k)] == lora_name(abstract_task=k) for k in used)
    text = (tmp_path / "b" / "README.md").read_text()
    assert "Not exact" in text and f"{a['answers_equal']} of 12" in text
    assert "vllm serve" in text and "--lora-modules" in text and "--max-lora-rank 8" in text


def test_orchmoe_needs_prompts_or_every_abstract_task(tmp_path):
    model = _model("orchmoe")
    with pytest.raises(BundleError, match="give prompts"):
        write_bundle(model, tmp_path / "b", check=0)
    assert not (tmp_path / "b").exists()
    manifest = write_bundle(model, tmp_path / "b", all_abstract_tasks=True, check=0)
    assert list(manifest["loras"]) == [lora_name(abstract_task=k) for k in range(3)]


@pytest.mark.parametrize("method", ["molora", "mode"])
def test_token_routing_is_refused(method, tmp_path):
    model = _model(method)
    with pytest.raises(RoutingError, match="routes every token separately"):
        write_bundle(model, tmp_path / "b", prompts=_prompts(2), check=0)
    with pytest.raises(RoutingError, match="cannot be exported as LoRA adapters"):
        export_peft_lora(model, tmp_path / "one")
    assert list(tmp_path.iterdir()) == []


def test_single_export_is_the_bundles_lora(tmp_path):
    model = _model("poly")
    export_peft_lora(model, tmp_path / "one", task_id=-1)
    write_bundle(model, tmp_path / "b", check=0)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "loras" / "task-unseen" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "one" / "orchmoe_export.json").read_text())["routing"] == {"task_id": -1}


def test_manifest_lookups():
    m = BundleManifest(
        "x",
        {
            "method": "poly",
            "loras": {"task-0": {}, "task-1": {}, "task-unseen": {}},
            "route": {"by": "task", "task_to_id": {"a": 0, "b": 1}},
        },
    )
    assert [m.lora_for(task=t) for t in ("a", "b", "zzz", 1, -1)] == ["task-0", "task-1", "task-unseen"] * 1 + [
        "task-1",
        "task-unseen",
    ]
    with pytest.raises(BundleError, match="out of range"):
        m.lora_for(task=7)
    with pytest.raises(BundleError, match="route by task"):
        m.lora_for(abstract_task=0)
    assert (
        lora_name() == "lora" and lora_name(task_id=-1) == "task-unseen" and lora_name(abstract_task=2) == "abstract-2"
    )
    with pytest.raises(BundleError):
        lora_name(task_id=-2)
