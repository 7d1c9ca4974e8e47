"""TRL's plain `SFTTrainer` trains orchmoe's methods, no orchmoe class in between: given the PEFT model, or given
``peft_config=`` an orchmoe config (TRL builds the PEFT model); adapter-only checkpoints, the two-speed optimiser
through ``optimizer_cls_and_kwargs``, MoLoRA's balance loss in the loss TRL sees, and Poly's task ids."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from core_helpers import method_config
from helpers_tokenizer import make_tiny_tokenizer
from orchmoe import OrchMoEConfig, RoutedAdamW, get_model, load_adapter
from orchmoe.training import add_routing_callbacks
from tiny_models import tiny_model

trl = pytest.importorskip("trl")

TASKS = [("Reverse the word", "olleh"), ("Add the numbers", "42"), ("Name the city", "Lisbon")]


def sft_dataset(n_per_task: int = 8, with_task_ids: bool = False):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over lazy dog food was great staff friendly".split()
    rows = {"prompt": [], "completion": []}
    if with_task_ids:
        rows["task_ids"] = []
    for t, (instruction, answer) in enumerate(TASKS):
        for _ in range(n_per_task):
            picks = torch.randint(0, len(words), (4,), generator=g).tolist()
            rows["prompt"].append(f"{instruction}. Input: {' '.join(words[i] for i in picks)}\nOutput:")
            rows["completion"].append(f" {answer}")
            if with_task_ids:
                rows["task_ids"].append(t)
    return Dataset.from_dict(rows)


def tied_llama(tok, method: str, seed: int = 0, **overrides):
    base = tiny_model("llama", vocab_size=len(tok))
    assert base.config.tie_word_embeddings
    torch.manual_seed(seed)
    return get_model(base, method_config(method, target_modules=["q_proj", "v_proj"], **overrides))


def sft_config(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=6,
        learning_rate=5e-2,
        max_steps=10,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        max_length=64,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return trl.SFTConfig(**base)


def losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_plain_sft_trainer_trains_orchmoe(tmp_path):
    tok = make_tiny_tokenizer()
    model = tied_llama(tok, "orchmoe")
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=sft_dataset(), processing_class=tok)
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 10 and seen[-1] < seen[0] - 0.3, seen
    after = model.adapter_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k or "task_router" in k)


def test_sft_trainer_builds_the_peft_model_from_an_orchmoe_config(tmp_path):
    """``peft_config=OrchMoEConfig(...)``: TRL calls peft.get_peft_model itself; the two-speed optimiser and the
    routing callbacks come as arguments and a line; checkpoints are adapter folders orchmoe and PEFT load."""
    tok = make_tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    config = OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=3, target_modules=["q_proj", "v_proj"])
    trainer = trl.SFTTrainer(
        model=base,
        args=sft_config(tmp_path, save_strategy="steps", save_steps=10),
        train_dataset=sft_dataset(),
        processing_class=tok,
        peft_config=config,
        optimizer_cls_and_kwargs=(RoutedAdamW, {"lr": 5e-2, "router_lr": 0.1}),
    )
    add_routing_callbacks(trainer)
    assert isinstance(trainer.model, peft.PeftModel) and trainer.model.peft_config["default"].method == "orchmoe"
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3 and all("pi_entropy" in r for r in logs)
    assert {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups} == {
        "experts": 5e-2,
        "allocation": 0.1,
        "routers": 5e-2,
    }
    ckpt = tmp_path / "checkpoint-10"
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "ORCHMOE_ORCHMOE"
    assert not (ckpt / "model.safetensors").exists()
    ids = torch.tensor([tok("Name the city. Input: the dog\nOutput:")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        for loaded in (
            load_adapter(tiny_model("llama", vocab_size=len(tok)), ckpt),
            peft.PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tok)), ckpt),
        ):
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_plain_sft_trainer_molora_adds_the_balance_loss_and_saves_adapters(tmp_path):
    tok = make_tiny_tokenizer()
    model = tied_llama(tok, "molora", aux_loss_coef=0.1)
    cfg = sft_config(tmp_path, save_strategy="steps", save_steps=5)
    trainer = add_routing_callbacks(
        trl.SFTTrainer(model=model, args=cfg, train_dataset=sft_dataset(), processing_class=tok)
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in logs) and logs[-1]["loss"] < logs[0]["loss"] - 0.3
    ckpt = tmp_path / "checkpoint-10"
    names = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "ORCHMOE_MOLORA"
    loaded = load_adapter(tiny_model("llama", vocab_size=len(tok)), ckpt)
    ids = torch.tensor([tok("Name the city. Input: the dog\nOutput:")["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_plain_sft_trainer_poly_with_task_ids(tmp_path):
    """Poly routes by task id: a collator that carries the dataset's task_ids column next to TRL's batch."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = make_tiny_tokenizer()
    pad = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)

    def collate(examples):
        batch = pad([{k: v for k, v in e.items() if k != "task_ids"} for e in examples])
        batch["task_ids"] = torch.tensor([e["task_ids"] for e in examples])
        return batch

    model = tied_llama(tok, "poly", n_tasks=len(TASKS))
    trainer = add_routing_callbacks(
        trl.SFTTrainer(
            model=model,
            args=sft_config(tmp_path, remove_unused_columns=False),
            train_dataset=sft_dataset(with_task_ids=True),
            processing_class=tok,
            data_collator=collate,
            optimizer_cls_and_kwargs=(RoutedAdamW, {"lr": 5e-2, "router_lr": 0.1}),
        )
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3
    assert {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups} == {"experts": 5e-2, "allocation": 0.1}
    assert all(r["router_learning_rate"] == pytest.approx(r["learning_rate"] * 0.1 / 5e-2) for r in logs)
