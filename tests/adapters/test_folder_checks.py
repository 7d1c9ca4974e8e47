"""`orchmoe.adapters.folder`: an adapter folder from anyone is checked before it costs anything: integer weights,
a config claiming more than its weights hold (refused before any allocation), a 0.2 folder's layer shapes; a
refused save leaves the model and the folder as they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core_helpers import method_config, randomize_adapter, tiny_base
from orchmoe import AdapterMismatchError, get_model, load_adapter, save_adapter
from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def _saved(tmp_path, method="orchmoe"):
    model = get_model(tiny_base("llama"), method_config(method))
    randomize_adapter(model.base_model)
    return model, save_adapter(model, tmp_path / "a")


def _edit(folder, fn) -> None:
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    fn(meta)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))


def test_integer_weights_are_refused_even_without_a_checksum(tmp_path):
    """Copied into float parameters they would be cast without a word (a corrupted or foreign file)."""
    _, folder = _saved(tmp_path)
    t = load_file(str(folder / ADAPTER_WEIGHTS))
    save_file({k: (v * 100).int() for k, v in t.items()}, str(folder / ADAPTER_WEIGHTS))
    _edit(folder, lambda m: m["orchmoe"].pop("weights_sha256"))
    with pytest.raises(
        AdapterMismatchError, match=r"adapter_model.safetensors: .* holds torch.int32 values, not float"
    ):
        load_adapter(tiny_base("llama"), folder)


@pytest.mark.parametrize(
    "method, field, value", [("orchmoe", "n_skills", 1_000_000), ("poly", "n_tasks", 10**9)], ids=["skills", "tasks"]
)
def test_a_config_claiming_far_more_than_its_weights_is_refused_before_allocating(method, field, value, tmp_path):
    """A few edited bytes would otherwise allocate gigabytes (a billion Poly tasks: 64 GB) before any check."""
    _, folder = _saved(tmp_path, method)
    _edit(folder, lambda m: m.update({field: value}))
    base = tiny_base("llama")
    with pytest.raises(AdapterMismatchError, match=r"adapter_config.json describes an adapter of [\d,]+ parameters"):
        load_adapter(base, folder)
    assert not hasattr(base, "peft_config")  # nothing was built


def test_a_legacy_folder_with_layers_that_are_not_shapes_is_named(tmp_path):
    model, folder = _saved(tmp_path)
    fields = model.base_model.adapter_config.method_fields()
    legacy = {
        "format": "orchmoe-adapter",
        "orchmoe_version": "0.2.0",
        "method": fields["method"],
        "config": fields,
        "layers": {k: "wide" for k in model.base_model.layer_shapes},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(legacy))
    with pytest.raises(AdapterMismatchError, match=r"adapter_config.json: layer '.*' must have a shape \[in, out\]"):
        load_adapter(tiny_base("llama"), folder)


def test_a_save_with_metadata_that_is_not_json_changes_nothing(tmp_path):
    model, folder = _saved(tmp_path)
    tuner = model.base_model
    tuner.adapter_metadata = {"tasks": ["a"]}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match="save_adapter: metadata must be JSON"):
        save_adapter(model, folder, metadata={"when": object()})
    with pytest.raises(TypeError, match="metadata must be JSON"):
        save_adapter(model, folder, metadata={"score": float("nan")})  # not JSON either (json.dumps writes NaN)
    assert tuner.adapter_metadata == {"tasks": ["a"]}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert torch.equal(
        load_adapter(tiny_base("llama"), folder).base_model.adapter_state_dict()["router.skill_router.logits"],
        tuner.adapter_state_dict()["router.skill_router.logits"],
    )
