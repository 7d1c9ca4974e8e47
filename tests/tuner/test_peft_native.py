"""orchmoe's methods as PEFT methods, seen from the Hugging Face tools: ``peft.get_peft_model`` /
``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM`` with an orchmoe config, PEFT's folder format,
outputs with an aux_loss field (DDP's pytree), get_base_model / unload / disable_adapter, task ids through
PEFT's forward (and the limit of a bare ``peft.get_peft_model``), a forward replaced by a library (TRL's fused
LM head, accelerate's autocast wrapper)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.utils._pytree as pytree

from core_helpers import method_config, randomize_adapter, task_kwargs, tiny_base, toy_batch
from orchmoe import (
    ConfigError,
    OrchMoEConfig,
    PolyConfig,
    RoutedModel,
    RoutingError,
    accept_task_ids,
    get_model,
    load_adapter,
    save_adapter,
)
from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS


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
        c = model.base_model(
            batch["input_ids"], batch["attention_mask"], task_ids=tasks
        ).logits  # the tuner, positional
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(c, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- PEFT's conventions and entry points
@pytest.mark.parametrize("method", ["orchmoe", "poly", "molora"])
def test_peft_get_peft_model_builds_a_peft_model_around_orchmoes_tuner(method):
    base = tiny_base("llama")
    model = peft.get_peft_model(base, method_config(method, task_type="CAUSAL_LM"))
    assert isinstance(model, peft.PeftModelForCausalLM) and isinstance(model.base_model, RoutedModel)
    assert model.get_base_model() is base and model.base_model.model is base
    assert model.get_output_embeddings() is base.lm_head and model.config is base.config
    assert str(model.peft_config["default"].peft_type.value) == f"ORCHMOE_{method.upper()}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("router" in n) for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == model.num_parameters_split()[0]


def test_a_bare_get_peft_model_loses_task_ids_in_pefts_forward_until_accepted():
    """The limit of PEFT's design: PeftModelForCausalLM.forward names task_ids itself and passes them on only to
    PEFT's own Poly. A model from orchmoe.get_model (or loaded by orchmoe or PEFT) accepts them; a bare
    peft.get_peft_model of a task-routed config says so, and accept_task_ids lifts the limit."""
    batch, tasks = toy_batch("llama")
    bare = peft.get_peft_model(tiny_base("llama"), PolyConfig(n_tasks=3, n_skills=2, rank=2, task_type="CAUSAL_LM"))
    with pytest.raises(RoutingError, match="accept_task_ids"):
        bare(input_ids=batch["input_ids"], task_ids=tasks)
    accept_task_ids(bare)
    assert bare(input_ids=batch["input_ids"], task_ids=tasks).logits.shape[:2] == batch["input_ids"].shape
    with pytest.raises(RoutingError, match="does not route by task id"):
        _routed("orchmoe")(input_ids=batch["input_ids"], task_ids=tasks)


def test_one_routed_adapter_per_model(tmp_path):
    model = _routed("lora")
    with pytest.raises(ConfigError, match="one adapter per model"):
        model.add_adapter("second", method_config("lora"))
    with pytest.raises(ConfigError, match="one routed adapter"):
        model.base_model.set_adapter("second")


def test_save_pretrained_writes_a_folder_peft_reads_and_never_the_base(tmp_path, monkeypatch):
    base = tiny_base("llama")
    model = get_model(base, method_config("orchmoe"), base_model_source="tiny/llama")
    monkeypatch.setattr(type(base), "save_pretrained", lambda *a, **k: pytest.fail("the base model was saved"))
    model.save_pretrained(tmp_path / "a")
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in (tmp_path / "a").iterdir()}
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert meta["peft_type"] == "ORCHMOE_ORCHMOE" and meta["task_type"] == "CAUSAL_LM"
    assert meta["base_model_name_or_path"] == "tiny/llama" and meta["orchmoe"]["weights_sha256"]
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert isinstance(config, OrchMoEConfig) and config.method_fields() == model.adapter_config.method_fields()


def test_peft_model_from_pretrained_round_trip(tmp_path):
    model = _routed("orchmoe").eval()
    batch, _ = toy_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, tmp_path / "a", metadata={"note": "x"})
    loaded = peft.PeftModel.from_pretrained(tiny_base("llama"), tmp_path / "a")
    assert isinstance(loaded.base_model, RoutedModel) and loaded.adapter_metadata == {"note": "x"}
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    trainable = peft.PeftModel.from_pretrained(tiny_base("llama"), tmp_path / "a", is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapter_state_dict().values())


@pytest.mark.parametrize("method", ["orchmoe", "mhr"])
def test_auto_peft_model_loads_the_base_named_in_the_folder(method, tmp_path):
    from peft import AutoPeftModelForCausalLM

    tiny_base("llama").save_pretrained(tmp_path / "base")
    model = get_model(tiny_base("llama"), method_config(method), base_model_source=str(tmp_path / "base"))
    randomize_adapter(model)
    model.eval()
    batch, tasks = toy_batch("llama")
    kw = task_kwargs(method, tasks)
    with torch.no_grad():
        expected = model(**batch, **kw).logits
    model.save_pretrained(tmp_path / "a")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert isinstance(auto.base_model, RoutedModel)
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch, **kw).logits, expected, atol=1e-6, rtol=1e-6)


def test_load_adapter_from_an_unreachable_hub_repo_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local adapter folder and could not be fetched"):
        load_adapter(tiny_base("llama"), "someone/no-such-orchmoe-adapter")


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
    save_adapter(model, tmp_path / "a")
    for wrapped in (model, model.get_base_model()):
        with pytest.raises(ValueError, match="already carries routed adapters.*unload"):
            load_adapter(wrapped, tmp_path / "a")


# ----------------------------------------------------------------------------- a forward replaced by TRL
@pytest.mark.parametrize("method", ["orchmoe", "poly", "molora"])
def test_trl_fused_lm_head_routes_from_the_prompt_and_keeps_the_aux_loss(method):
    """TRL's add_fused_lm_head replaces the transformers model's forward by one that calls its backbone and the
    output embeddings: orchmoe's hooks route around it, so it computes the same per-token log-probs under the
    prompt's routing, and the balance loss reaches its output."""
    from trl.trainer.utils import add_fused_lm_head

    batch, tasks = toy_batch("llama")
    model = _routed(method).train()
    kw = task_kwargs(method, tasks)
    torch.manual_seed(0)
    ref = model(**batch, **kw)
    logp = torch.log_softmax(ref.logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["labels"][:, 1:] != -100
    add_fused_lm_head(model.get_base_model())  # on the transformers model, as TRL does under PEFT
    torch.manual_seed(0)  # the same Gumbel noise / routing
    if method == "molora":
        with pytest.warns(UserWarning, match="log_probs"):
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
    """accelerate.prepare(mixed_precision="bf16") replaces the PeftModel's forward by an autocast wrapper: the
    call is routed by the hooks (task_ids never reach the transformers model) and keeps its aux_loss."""
    from accelerate import Accelerator

    batch, tasks = toy_batch("llama")
    model = _routed(method).train()
    torch.manual_seed(0)  # the same Gumbel noise
    ref = model(**batch, **task_kwargs(method, tasks))
    from accelerate.state import AcceleratorState

    try:
        prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        assert prepared is model and "forward" in model.__dict__  # accelerate replaced the PeftModel's forward
        torch.manual_seed(0)
        out = prepared(**batch, **task_kwargs(method, tasks))
    finally:
        AcceleratorState._reset_state(True)  # the process-wide state: later tests build their own
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-2, rtol=0)
    assert (out.aux_loss is None) == (ref.aux_loss is None)
