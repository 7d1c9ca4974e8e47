"""The adapter folder (`orchmoe.adapters.folder`): save and load round trips, what a load checks (shapes,
layers, tensors, checksums, the recorded base), and the 0.1 / 0.2 folders converted on the fly."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from core_helpers import (
    METHOD_NAMES,
    lm_logits,
    method_config,
    randomize_adapter,
    task_kwargs,
    tiny_base,
    toy_batch,
)
from orchmoe import (
    AdapterMismatchError,
    PolyConfig,
    get_model,
    load_adapter,
    save_adapter,
)
from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from orchmoe.adapters.provenance import model_fingerprint


def write_legacy_config(model, folder, version, alpha):
    """The adapter_config.json orchmoe 0.1 / 0.2 wrote for this model (the tensors were named alike)."""
    cfg = model.adapter_config.method_fields()
    cfg["alpha"] = alpha
    meta = {
        "format": "orchmoe-adapter",
        "orchmoe_version": version,
        "method": cfg["method"],
        "config": cfg,
        "base_model": {"name": "tiny", **model_fingerprint(model.get_base_model(), with_weights=False)},
        "layers": {k: list(v) for k, v in model.layer_shapes.items()},
        "metadata": {},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))


def _routed(arch, method, seed=0, **overrides):
    model = get_model(tiny_base(arch, seed=seed), method_config(method, **overrides))
    randomize_adapter(model)
    return model.eval()


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_save_load_round_trip_is_exact(method, tmp_path):
    arch = "t5" if method == "mode" else "llama"
    model = _routed(arch, method)
    batch, tasks = toy_batch(arch)
    kw = task_kwargs(method, tasks)
    expected = lm_logits(model, batch, **kw)
    save_adapter(model, tmp_path / "a", metadata={"note": "x"})
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert meta["peft_type"] == f"ORCHMOE_{method.upper()}"
    assert meta["orchmoe"]["trainable_parameters"] == model.num_parameters_split()[0]
    loaded = load_adapter(tiny_base(arch), tmp_path / "a")
    assert loaded.adapter_metadata == {"note": "x"} and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(lm_logits(loaded, batch, **kw), expected)
    trainable = load_adapter(tiny_base(arch), tmp_path / "a", is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapter_state_dict().values())


def test_task_router_statistics_travel_with_the_adapter(tmp_path):
    """The prompt-summary statistics are adapter state: saved and loaded (outputs equal), not counted
    as trainable, not given to the optimiser, and updated only by training forwards."""
    model = _routed("llama", "orchmoe")
    batch, _ = toy_batch("llama")
    model.train()(**batch)  # a training forward gathers statistics
    stats = {k: v.clone() for k, v in model.adapter_buffers().items()}
    assert sorted(stats) == [
        "router.task_router.summary_count",
        "router.task_router.summary_mean",
        "router.task_router.summary_var",
    ]
    assert int(stats["router.task_router.summary_count"]) == batch["input_ids"].shape[0]
    model.eval()
    expected = lm_logits(model, batch)
    model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2, do_sample=False
    )
    model.train().generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2, do_sample=False
    )
    assert all(torch.equal(v, stats[k]) for k, v in model.adapter_buffers().items())  # generation never updates them
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert meta["orchmoe"]["trainable_parameters"] == sum(p.numel() for p in model.adapter_state_dict().values())
    loaded = load_adapter(tiny_base("llama"), tmp_path / "a")
    assert all(torch.equal(v, stats[k]) for k, v in loaded.adapter_buffers().items())
    assert torch.equal(lm_logits(loaded, batch), expected)
    fresh = load_adapter(tiny_base("llama"), tmp_path / "a")
    with torch.no_grad():  # without them (the initial values) the same weights route differently
        (
            fresh.task_router.summary_mean.zero_(),
            fresh.task_router.summary_var.fill_(1.0),
            fresh.task_router.summary_count.zero_(),
        )
    assert not torch.allclose(lm_logits(fresh, batch), expected)
    grouped = {id(p) for g in model.parameter_groups(1e-3, 1e-2) for p in g["params"]}
    assert not any(id(b) in grouped for b in model.adapter_buffers().values())


@pytest.fixture
def saved(tmp_path):
    save_adapter(_routed("llama", "poly"), tmp_path / "a")
    return tmp_path / "a"


def test_load_onto_another_model_shape_names_the_difference(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(AdapterMismatchError, match="hidden_size: adapter 32 vs model 48"):
        load_adapter(other, saved)
    with pytest.raises(AdapterMismatchError, match="model_type: adapter 'llama' vs model 'gpt2'"):
        load_adapter(tiny_base("gpt2"), saved)
    fresh = get_model(tiny_base("llama"), method_config("poly", n_skills=2))
    with pytest.raises(AdapterMismatchError, match=r"lora_A has shape \(4, 32, 2\), model expects \(2, 32, 2\)"):
        fresh.load_adapter(saved, adapter_name="default")  # PEFT's loading, through orchmoe's checks


def test_load_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tiny_base("llama"), tmp_path / "nothing")
    cfg_file = saved / ADAPTER_CONFIG
    good = cfg_file.read_text()
    cfg_file.write_text(good[:-20])
    with pytest.raises(AdapterMismatchError, match="not valid JSON"):
        load_adapter(tiny_base("llama"), saved)
    cfg_file.write_text(json.dumps({"format": "something"}))
    with pytest.raises(AdapterMismatchError, match="not an orchmoe adapter"):
        load_adapter(tiny_base("llama"), saved)
    meta = json.loads(good)
    meta["peft_type"] = "ORCHMOE_WIZARD"
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="invalid adapter config: unknown method 'wizard'"):
        load_adapter(tiny_base("llama"), saved)
    meta = json.loads(good)
    meta["orchmoe"]["layers"] = ["model.layers.0.self_attn.q_proj"]
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="'orchmoe.layers' must be a mapping"):
        load_adapter(tiny_base("llama"), saved)
    meta = json.loads(good)
    meta["n_skills"] = 0
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="n_skills must be >= 1"):
        load_adapter(tiny_base("llama"), saved)
    meta = json.loads(good)
    meta["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="other layers"):
        load_adapter(tiny_base("llama"), saved)
    cfg_file.write_text(good)
    (saved / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        load_adapter(tiny_base("llama"), saved)


def test_load_with_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(_routed("llama", "orchmoe"), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    tensors.pop("router.task_router.net.weight")
    save_file(tensors, str(tmp_path / "a" / ADAPTER_WEIGHTS))
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    del meta["orchmoe"]["weights_sha256"]  # edited on purpose: the checksum no longer applies
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match=r"missing tensors \['router.task_router.net.weight'\]"):
        load_adapter(tiny_base("llama"), tmp_path / "a")


def test_poly_config_used_in_roundtrip_keeps_task_count(tmp_path):
    model = get_model(tiny_base("llama"), PolyConfig(n_tasks=5, n_skills=2, rank=2))
    save_adapter(model, tmp_path / "p")
    loaded = load_adapter(tiny_base("llama"), tmp_path / "p").adapter_config
    assert loaded.method_fields() == model.adapter_config.method_fields() and loaded.n_tasks == 5


@pytest.mark.parametrize("method", ["poly", "orchmoe", "lora"])
def test_adapters_written_by_orchmoe_0_1_load_with_their_scale_and_layout(method, tmp_path):
    """0.1 kept one allocation matrix per layer, the Task Router at task_router.*, and left alpha unset
    (Poly/MHR/OrchMoE then meant 1/r): such a folder loads and computes what it computed then."""
    from safetensors.torch import load_file, save_file

    model = _routed("llama", method, alpha=1.0 if method != "lora" else None)
    batch, tasks = toy_batch("llama")
    kw = task_kwargs(method, tasks)
    expected = lm_logits(model, batch, **kw)
    save_adapter(model, tmp_path / "a")
    write_legacy_config(model, tmp_path / "a", version="0.1.0", alpha=None)  # 0.1 wrote no checksum
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    stacked = tensors.pop("router.logits", None)
    if stacked is None:
        stacked = tensors.pop("router.skill_router.logits", None)
    if stacked is not None:
        for i, path in enumerate(model.routed_layers):
            tensors[f"{path}.router.logits"] = stacked[i].clone()
    tensors = {(k[len("router.") :] if k.startswith("router.task_router.") else k): v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "a" / ADAPTER_WEIGHTS))
    with pytest.warns(UserWarning, match="converted on load"):
        loaded = load_adapter(tiny_base("llama"), tmp_path / "a")
    assert loaded.adapter_config.scale == model.adapter_config.scale
    torch.testing.assert_close(lm_logits(loaded, batch, **kw), expected)


@pytest.mark.parametrize("method", ["poly", "orchmoe", "molora"])
def test_adapters_written_by_orchmoe_0_2_load_and_save_again_in_the_peft_format(method, tmp_path):
    """0.2's own adapter_config.json (the same tensor names) loads with a note; saved again, it is PEFT's."""
    model = _routed("llama", method)
    batch, tasks = toy_batch("llama")
    kw = task_kwargs(method, tasks)
    expected = lm_logits(model, batch, **kw)
    save_adapter(model, tmp_path / "a")
    write_legacy_config(
        model, tmp_path / "a", version="0.2.0", alpha=model.adapter_config.scale * model.adapter_config.rank
    )
    with pytest.warns(UserWarning, match="converted on load"):
        loaded = load_adapter(tiny_base("llama"), tmp_path / "a")
    assert torch.equal(lm_logits(loaded, batch, **kw), expected)
    save_adapter(loaded, tmp_path / "b")
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())["peft_type"] == f"ORCHMOE_{method.upper()}"
    assert torch.equal(lm_logits(load_adapter(tiny_base("llama"), tmp_path / "b"), batch, **kw), expected)


def test_adapter_files_are_checked_before_use(tmp_path):
    """A newer major version, a config without alpha, a truncated or non-finite weights file: clear errors."""
    from safetensors.torch import load_file, save_file

    save_adapter(_routed("llama", "poly"), tmp_path / "a")
    cfg_file, weights = tmp_path / "a" / ADAPTER_CONFIG, tmp_path / "a" / ADAPTER_WEIGHTS
    good, good_weights = cfg_file.read_text(), weights.read_bytes()
    meta = json.loads(good)
    meta["orchmoe"]["orchmoe_version"] = "99.0.0"
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="newer major version"):
        load_adapter(tiny_base("llama"), tmp_path / "a")
    meta = json.loads(good)
    del meta["alpha"]
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="has no 'alpha'"):
        load_adapter(tiny_base("llama"), tmp_path / "a")
    cfg_file.write_text(good)
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(AdapterMismatchError, match="not a readable safetensors file"):
        load_adapter(tiny_base("llama"), tmp_path / "a")
    weights.write_bytes(good_weights)
    tensors = load_file(str(weights))
    tensors["router.logits"][0, 0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(AdapterMismatchError, match="'router.logits' holds NaN"):
        load_adapter(tiny_base("llama"), tmp_path / "a")


def test_a_folder_saved_for_other_layers_is_refused_and_the_base_is_left_as_it_was(saved, tmp_path):
    meta_file = saved / ADAPTER_CONFIG
    meta = json.loads(meta_file.read_text())
    path, shape = next(iter(meta["orchmoe"]["layers"].items()))
    meta["orchmoe"]["layers"][path] = [shape[0], shape[1] + 1]  # a layer of another width than this model's
    meta_file.write_text(json.dumps(meta))
    base = tiny_base("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="saved for other layers than this model has"):
        load_adapter(base, saved)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__name__ == "RoutedLoraLayer" for m in base.modules())
    meta["orchmoe"]["layers"][path] = shape  # put right again: the same base then takes it
    meta_file.write_text(json.dumps(meta))
    assert load_adapter(base, saved).base_model.layer_shapes[path] == tuple(shape)


def test_a_failed_save_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    model = _routed("llama", "lora")
    save_adapter(model, tmp_path / "a")
    old = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        next(iter(model.adapter_state_dict().values())).add_(1.0)

    def half_written(self, folder, *args, **kwargs):
        (Path(folder) / ADAPTER_WEIGHTS).write_bytes(b"half")
        raise OSError("disk pulled out")

    monkeypatch.setattr(model, "save_pretrained", functools.partial(half_written, model))  # the instance's own save
    with pytest.raises(OSError, match="disk pulled out"):
        save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left behind
