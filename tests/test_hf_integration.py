"""A RoutedModel as the Hugging Face tools see it: outputs with an aux_loss field (DDP's pytree),
adapter-only save_pretrained / from_pretrained / push_to_hub, get_base_model / unload, the HF
``base_model`` (backbone) convention and a forward replaced by a library (TRL's fused LM head)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils._pytree as pytree

from core_helpers import method_config, randomize_adapter, task_kwargs, tiny_base, toy_batch
from orchmoe import HubError, RoutedModel, get_model, load_adapter
from orchmoe.tuner.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def _routed(method, arch="llama", **overrides):
    model = get_model(tiny_base(arch), method_config(method, **overrides))
    randomize_adapter(model)
    return model


# ----------------------------------------------------------------------------- outputs
def test_outputs_have_an_aux_loss_field_that_ddp_pytree_rebuilds():
    batch, _ = toy_batch("llama")
    lora = _routed("lora").train()
    out = lora(**batch)
    assert out.aux_loss is None and "aux_loss" not in out  # a field, unset: no AttributeError
    molora = _routed("molora").train()
    out = molora(**batch)
    assert type(out).__name__ == "RoutedCausalLMOutputWithPast" and out.aux_loss.requires_grad
    assert list(out.keys())[:2] == ["loss", "logits"] and out.to_tuple()[-1] is out.aux_loss
    # DDP flattens the output and rebuilds it from its fields: an extra dict key used to raise TypeError here
    leaves, spec = pytree.tree_flatten(out)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(out) and rebuilt.aux_loss is out.aux_loss and rebuilt.loss is out.loss


def test_positional_call_routes_like_keywords():
    model = _routed("poly").eval()
    batch, tasks = toy_batch("llama")
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], task_ids=tasks).logits
        b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=tasks).logits
        c = model.forward(batch["input_ids"], batch["attention_mask"], None, tasks).logits  # forward as a function
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(c, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- the HF attribute conventions
def test_base_model_is_the_backbone_and_get_base_model_the_wrapped_model():
    base = tiny_base("llama")
    model = get_model(base, method_config("orchmoe"))
    assert model.get_base_model() is base and model.model is base
    assert model.base_model is base.model and type(model.base_model).__name__ == "LlamaModel"  # HF convention
    t5 = tiny_base("t5")
    assert get_model(t5, method_config("lora")).base_model is t5  # no backbone attribute: the model itself
    assert model.get_output_embeddings() is base.lm_head and model.config is base.config


def test_persistence_and_adapter_methods_are_not_forwarded_to_the_base_model(tmp_path, monkeypatch):
    base = tiny_base("llama")
    model = get_model(base, method_config("orchmoe"))
    monkeypatch.setattr(type(base), "save_pretrained", lambda *a, **k: pytest.fail("the base model was saved"))
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["format"] == "orchmoe-adapter"
    for name in ("load_adapter", "add_adapter", "set_adapter", "active_adapters", "enable_adapters"):
        assert hasattr(base, name)
        with pytest.raises(AttributeError, match=name):
            getattr(model, name)
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path / "b", safe_serialization=False)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = _routed("orchmoe").eval()
    batch, _ = toy_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "a", metadata={"note": "x"})
    assert model.save_pretrained(tmp_path / "none", is_main_process=False) == tmp_path / "none"
    assert not (tmp_path / "none").exists()
    loaded = RoutedModel.from_pretrained(tiny_base("llama"), tmp_path / "a")
    assert loaded.adapter_metadata == {"note": "x"} and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        RoutedModel.from_pretrained(tiny_base("llama"), tmp_path / "missing")


def test_from_pretrained_from_an_unreachable_hub_repo_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local adapter folder and could not be fetched"):
        RoutedModel.from_pretrained(tiny_base("llama"), "someone/no-such-orchmoe-adapter")


def test_push_to_hub_uploads_the_adapter_folder(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = {}

    def fake_create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def fake_upload(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        calls["upload"] = (
            repo_id,
            kw,
            sorted(p.name for p in Path(folder_path).iterdir()),
            json.loads((Path(folder_path) / ADAPTER_CONFIG).read_text())["method"],
            (Path(folder_path) / "README.md").read_text(),
        )
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload)
    model = _routed("molora")
    assert model.push_to_hub("me/molora-tiny", private=True) == "commit-info"
    assert calls["create"] == ("me/molora-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo, kw, files, method, card = calls["upload"]
    assert repo == "me/molora-tiny" and files == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"])
    assert method == "molora" and "library_name: orchmoe" in card and kw["commit_message"] == "Upload molora adapter"

    def failing_upload(self, **kw):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", failing_upload)
    with pytest.raises(HubError, match="me/x.*failed: ConnectionError: network is unreachable"):
        model.push_to_hub("me/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        model.push_to_hub("me/x")


# ----------------------------------------------------------------------------- unload
@pytest.mark.parametrize("method", ["orchmoe", "molora"])
def test_unload_restores_the_clean_base_model(method):
    from torch import nn

    fresh = tiny_base("llama")
    base = tiny_base("llama")
    base.lm_head.weight.requires_grad_(False)  # a flag the user set before get_model is kept
    model = get_model(base, method_config(method))
    randomize_adapter(model)
    ids = torch.randint(3, 60, (2, 7))
    clean = model.unload()
    assert clean is base and isinstance(clean.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not clean.lm_head.weight.requires_grad and clean.model.layers[0].mlp.up_proj.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(clean(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="unloaded"):
        model(input_ids=ids)
    again = get_model(clean, method_config(method))  # the base can be wrapped again
    assert len(again.routed_layers) == 4


def test_disable_adapter_context_and_deepcopy():
    import copy

    fresh = tiny_base("llama")
    model = _routed("molora").eval()
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, routed, atol=0, rtol=0)  # enabled again
        twin = copy.deepcopy(model)  # the hooks and the routing state are copied with it
        torch.testing.assert_close(twin(input_ids=ids).logits, routed, atol=0, rtol=0)
    assert twin.routing_state is not model.routing_state
    assert all(layer.state is twin.routing_state for layer in twin.routed_layers.values())


def test_load_adapter_onto_a_wrapped_model_is_a_clear_error(tmp_path):
    model = _routed("lora")
    model.save_adapter(tmp_path / "a")
    for wrapped in (model, model.get_base_model()):
        with pytest.raises(ValueError, match="already carries routed adapters.*unload"):
            load_adapter(wrapped, tmp_path / "a")


# ----------------------------------------------------------------------------- a forward replaced by TRL
@pytest.mark.parametrize("method", ["orchmoe", "poly", "molora"])
def test_trl_fused_lm_head_routes_from_the_prompt_and_keeps_the_aux_loss(method):
    """TRL's add_fused_lm_head replaces model.forward by one that calls model.base_model (the backbone) and
    the output embeddings: it computes the same per-token log-probs as our forward, under the prompt's routing."""
    from trl.trainer.utils import add_fused_lm_head

    batch, tasks = toy_batch("llama")
    model = _routed(method).train()
    kw = task_kwargs(method, tasks)
    torch.manual_seed(0)
    ref = model(**batch, **kw)
    logp = torch.log_softmax(ref.logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["labels"][:, 1:] != -100
    add_fused_lm_head(model)
    torch.manual_seed(0)  # the same Gumbel noise / routing
    if method == "molora":
        with pytest.warns(UserWarning, match="RoutedSFTTrainer"):
            fused = model(**batch, **kw, fused_lm_head=True)
    else:
        fused = model(**batch, **kw, fused_lm_head=True)
    torch.testing.assert_close(fused.log_probs[mask], logp[mask], atol=1e-5, rtol=1e-5)
    if method == "molora":  # the balance loss is in the output (a trainer reading .loss keeps it)
        torch.testing.assert_close(fused.aux_loss, ref.aux_loss)
        torch.testing.assert_close(fused.loss, -logp[mask].mean() + ref.aux_loss, atol=1e-5, rtol=1e-5)
    else:
        assert fused.aux_loss is None
    with torch.no_grad():  # the replaced forward without the fused head is ours, routed once
        plain = model.eval()(**batch, **kw)
    assert plain.logits.shape == ref.logits.shape


@pytest.mark.parametrize("method", ["poly", "molora"])
def test_accelerate_autocast_wrapper_routes_through_the_hooks(method):
    """accelerate.prepare(mixed_precision="bf16") replaces model.forward by an autocast wrapper of ours: the call
    is routed by the pre-hook (task_ids never reach the transformers model) and keeps its aux_loss."""
    from accelerate import Accelerator

    batch, tasks = toy_batch("llama")
    model = _routed(method).train()
    torch.manual_seed(0)  # the same Gumbel noise
    ref = model(**batch, **task_kwargs(method, tasks))
    from accelerate.state import AcceleratorState

    try:
        prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        assert prepared is model and "forward" in model.__dict__
        torch.manual_seed(0)
        out = prepared(**batch, **task_kwargs(method, tasks))
    finally:
        AcceleratorState._reset_state(True)  # the process-wide state: later tests build their own
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-2, rtol=0)
    assert (out.aux_loss is None) == (ref.aux_loss is None)
