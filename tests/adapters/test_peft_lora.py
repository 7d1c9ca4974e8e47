"""PEFT both ways: a peft.LoraConfig where orchmoe expects its config; every mixture started from a
PEFT LoRA folder equals that LoRA; exported folders name a base that AutoPeftModelForCausalLM loads
and say when its weights were dequantised from GGUF."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from core_helpers import CROSS_PATH, N_TASKS, task_kwargs, tiny_base
from orchmoe import (
    AdapterMismatchError,
    ConfigError,
    LoraConfig,
    MHRConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    PolyConfig,
    get_model,
    load_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- peft.LoraConfig in
def test_peft_lora_config_is_converted():
    model = get_model(tiny_base("llama"), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    cfg = model.adapter_config
    assert isinstance(cfg, LoraConfig) and (cfg.rank, cfg.alpha, cfg.dropout, cfg.scale) == (4, 8.0, 0.1, 2.0)
    assert sorted(model.routed_layers) == sorted(f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in TARGETS)
    rs = get_model(tiny_base("llama"), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS))
    assert rs.adapter_config.scale == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    every = get_model(tiny_base("llama"), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert {p.rsplit(".", 1)[-1] for p in every.routed_layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }  # not lm_head
    default = get_model(tiny_base("llama"), peft.LoraConfig(r=2))  # PEFT's default targets for llama
    assert {p.rsplit(".", 1)[-1] for p in default.routed_layers} == set(TARGETS)


@pytest.mark.parametrize(
    "setting, name",
    [
        (dict(use_dora=True), "use_dora=True"),
        (dict(bias="all"), "bias='all'"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_unsupported_peft_settings_are_named(setting, name):
    with pytest.raises(ConfigError, match=f"peft.LoraConfig sets .*{name}.*orchmoe does not support"):
        get_model(tiny_base("llama"), peft.LoraConfig(r=4, target_modules=TARGETS, **setting))


def test_other_peft_methods_and_objects_are_clear_errors():
    with pytest.raises(ConfigError, match=r"peft.IA3Config .*no orchmoe counterpart.*LoraConfig, PolyConfig"):
        get_model(tiny_base("llama"), peft.IA3Config(target_modules=TARGETS, feedforward_modules=[]))
    with pytest.raises(TypeError, match="orchmoe config .* or a peft.LoraConfig, got dict"):
        get_model(tiny_base("llama"), {"rank": 4})
    poly = get_model(
        tiny_base("llama"), peft.PolyConfig(r=2, n_tasks=3, n_skills=4, n_splits=4, target_modules=TARGETS)
    )
    assert isinstance(poly.adapter_config, MHRConfig) and poly.adapter_config.scale == 0.5  # PEFT's Poly: 1/r


# ----------------------------------------------------------------------------- start from a PEFT LoRA
@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A PEFT LoRA (r=4, alpha=8: scale 2) with random A and B, saved as a folder."""
    pm = peft.get_peft_model(tiny_base("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("peft") / "lora"
    pm.save_pretrained(folder)
    return folder


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits


INIT_CASES = {  # rank 4 everywhere; alpha = rank (scale 1) unless set, so PEFT's scale 2 is folded into B
    "lora": LoraConfig(rank=4, target_modules=TARGETS),
    "poly": PolyConfig(n_tasks=N_TASKS, n_skills=3, rank=4, target_modules=TARGETS),
    "mhr": MHRConfig(n_tasks=N_TASKS, n_skills=3, rank=4, n_splits=4, target_modules=TARGETS),
    "orchmoe": OrchMoEConfig(n_skills=3, rank=4, n_abstract_tasks=3, alpha=8, target_modules=TARGETS),
    "molora": MoLoRAConfig(n_skills=3, rank=4, top_k=2, target_modules=TARGETS),
    "mode": MoDEConfig(n_skills=3, rank=4, expert_rank=2, target_modules=TARGETS),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(INIT_CASES))
def test_every_mixture_starts_equal_to_the_peft_lora(case, mode, peft_lora):
    """All skills = the LoRA: the mixture is the LoRA whatever the routing (training-mode Gumbel noise included)."""
    ids = torch.randint(3, 60, (3, 8), generator=torch.Generator().manual_seed(0))
    expected = _logits(peft.PeftModel.from_pretrained(tiny_base("llama"), peft_lora).eval(), ids)
    ours = get_model(tiny_base("llama"), INIT_CASES[case], init_lora=peft_lora)
    ours.train(mode == "train")
    got = _logits(ours, ids, **task_kwargs(case, [0, 2, 1]))
    assert not torch.allclose(got, _logits(tiny_base("llama"), ids), atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(got, expected, **CROSS_PATH)


def test_init_from_lora_checks_rank_and_layers(peft_lora, tmp_path):
    with pytest.raises(AdapterMismatchError, match="rank r=4, this poly adapter rank 2: build it with rank=4"):
        get_model(tiny_base("llama"), PolyConfig(n_tasks=2, rank=2, target_modules=TARGETS), init_lora=peft_lora)
    with pytest.raises(AdapterMismatchError, match=r"other layers.*only here \['model.layers.0.self_attn.k_proj'"):
        get_model(
            tiny_base("llama"), LoraConfig(rank=4, target_modules=["q_proj", "k_proj", "v_proj"]), init_lora=peft_lora
        )
    dora = tmp_path / "dora"
    shutil.copytree(peft_lora, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=True"):
        get_model(tiny_base("llama"), LoraConfig(rank=4, target_modules=TARGETS), init_lora=dora)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        get_model(tiny_base("llama"), LoraConfig(rank=4, target_modules=TARGETS), init_lora=tmp_path)


# ----------------------------------------------------------------------------- exported folders name their base
def test_export_names_a_base_that_auto_peft_loads(tiny_llama, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from orchmoe.loading.pretrained import load_model_and_tokenizer

    base, _, info = load_model_and_tokenizer(tiny_llama)
    model = get_model(
        base, PolyConfig(n_tasks=N_TASKS, n_skills=3, rank=2, target_modules=TARGETS), base_model_name=info["name"]
    )
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.normal_(0, 0.3)
    model.eval()
    assert model.base_model_name == "tiny-llama" and model.base_model_source == info["source"] == str(
        tiny_llama.resolve()
    )
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["orchmoe"]["base_model"]
    assert saved["name"] == "tiny-llama" and saved["source"] == info["source"]
    folder = model.export_peft_lora(tmp_path / "peft", task_id=1)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == info["source"]
    assert "dequantized_from_gguf" not in json.loads((folder / "orchmoe_export.json").read_text())
    auto = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()  # finds the base by itself
    ids = torch.randint(3, 60, (2, 7))
    torch.testing.assert_close(_logits(auto, ids), _logits(model, ids, task_ids=torch.tensor([1, 1])), **CROSS_PATH)
    # the source travels with the adapter: a base built from a config has no path, the adapter's is kept
    config = copy.deepcopy(base.config)
    config._name_or_path = ""
    reloaded = load_adapter(type(base)(config), tmp_path / "adapter")
    assert reloaded.base_model_source == info["source"]
    assert (
        load_adapter(type(base)(config), tmp_path / "adapter", base_model_source="org/tiny").base_model_source
        == "org/tiny"
    )


def test_export_says_when_the_base_was_dequantised_from_gguf(tiny_llama, tmp_path):
    from orchmoe.loading.gguf import CACHE_MARKER
    from orchmoe.loading.pretrained import load_model_and_tokenizer

    cached = tmp_path / "cache" / "models" / "smollm2-q8"
    shutil.copytree(tiny_llama, cached)  # stands for the checkpoint convert_gguf writes, with its marker
    (cached / CACHE_MARKER).write_text(json.dumps({"source": "/models/SmolLM2-135M-Q8_0.gguf", "name": "SmolLM2-Q8"}))
    base, _, info = load_model_and_tokenizer(cached)
    model = get_model(base, LoraConfig(rank=2, target_modules=TARGETS), base_model_name=info["name"])
    folder = model.export_peft_lora(tmp_path / "peft")
    note = json.loads((folder / "orchmoe_export.json").read_text())
    assert note["dequantized_from_gguf"] == "/models/SmolLM2-135M-Q8_0.gguf"
    assert note["converted_checkpoint"] == str(cached.resolve()) and note["base_model_name"] == "SmolLM2-Q8"
    assert "dequantised from the GGUF file `/models/SmolLM2-135M-Q8_0.gguf`" in (folder / "README.md").read_text()
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["orchmoe"]["base_model"]
    assert saved["dequantized_from_gguf"] == "/models/SmolLM2-135M-Q8_0.gguf"
