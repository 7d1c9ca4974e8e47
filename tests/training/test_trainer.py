"""A plain `transformers.Trainer` with an orchmoe PEFT model, no orchmoe class in between: adapter-only checkpoints
on a tied-embedding base, bit-exact resume, reload with PEFT and orchmoe, the two-speed optimiser through
``optimizer_cls_and_kwargs``, the auxiliary loss scaled like the LM loss, routing diagnostics in the logs, a stop
on a non-finite loss, and 2-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from core_helpers import method_config
from distributed_helpers import free_port, launch
from orchmoe import AdapterMismatchError, RoutedAdamW, get_model, load_adapter
from orchmoe.training import NonFiniteLossError, RoutedDataCollator, add_routing_callbacks
from tiny_models import tiny_model

TESTS = Path(__file__).resolve().parent
VOCAB = 128


def toy_dataset(n_per_task: int = 8, seed: int = 0, with_task_ids: bool = False):
    """3 tasks: prompt = a task marker + random tokens, answer = a fixed 3-token string per task."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    if with_task_ids:
        rows["task_id"] = []
    for t in range(3):
        for _ in range(n_per_task):
            prompt = [4 + t] + torch.randint(40, VOCAB, (6,), generator=g).tolist()
            answer = [10 + 5 * t, 11 + 5 * t, 12 + 5 * t]
            rows["input_ids"].append(prompt + answer)
            rows["attention_mask"].append([1] * 10)
            rows["labels"].append([-100] * len(prompt) + answer)
            if with_task_ids:
                rows["task_id"].append(t)
    return Dataset.from_dict(rows)


def routed(method: str, seed: int = 0, **overrides):
    """A routed tiny Llama with tied embeddings (as SmolLM2), the adapter initialised from ``seed``."""
    base = tiny_model("llama", vocab_size=VOCAB)
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    torch.manual_seed(seed)
    return get_model(base, method_config(method, target_modules=["q_proj", "v_proj"], **overrides))


def args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="linear",
        remove_unused_columns=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def trainer_for(model, training_args, data, router_lr: float = 0.1, **kw) -> Trainer:
    """The documented lines: the optimizer factory, the collator, the callbacks put first."""
    collator = RoutedDataCollator(0, routes_by_task=model.peft_config["default"].needs_task_ids)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=collator,
        optimizer_cls_and_kwargs=(
            RoutedAdamW,
            {"lr": training_args.learning_rate, "router_lr": router_lr, "weight_decay": training_args.weight_decay},
        ),
        **kw,
    )
    return add_routing_callbacks(trainer)


def adapter_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in {**model.adapter_state_dict(), **model.adapter_buffers()}.items()}


def test_checkpoints_are_adapter_only_and_resume_bit_exactly(tmp_path):
    data = toy_dataset()
    full = routed("orchmoe")
    trainer = trainer_for(full, args(tmp_path / "a", save_strategy="steps", save_steps=3), data)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names  # no frozen base weights
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_of(full)) and not any("embed_tokens" in k for k in saved)

    # a second run, killed after checkpoint-3 (here: a fresh model and trainer), resumes to the same adapter
    resumed = routed("orchmoe", seed=1)  # another initialisation: everything must come from the checkpoint
    t2 = trainer_for(resumed, args(tmp_path / "b"), data)
    t2.train(resume_from_checkpoint=str(ckpt))
    a, b = adapter_of(full), adapter_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = [[r["loss"] for r in t.state.log_history if "loss" in r and r["step"] > 3] for t in (trainer, t2)]
    assert after[0] == after[1] and len(after[0]) == 3  # the resumed run logs the same losses

    # the last checkpoint and save_model() are adapter folders that PEFT and orchmoe read
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.tensor(data["input_ids"][:4])
    full.eval()
    with torch.no_grad():
        expected = full(input_ids=ids).logits
    for folder in (tmp_path / "final", tmp_path / "a" / "checkpoint-6"):
        for loaded in (
            load_adapter(tiny_model("llama", vocab_size=VOCAB), folder),
            peft.PeftModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB), folder),
        ):
            with torch.no_grad():
                torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_resume_rejects_a_checkpoint_of_another_adapter(tmp_path):
    data = toy_dataset()
    trainer_for(routed("lora"), args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2), data).train()
    other = trainer_for(routed("lora", rank=2), args(tmp_path / "b", max_steps=2), data)
    with pytest.raises(AdapterMismatchError, match=r"lora_A has shape .*model expects"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_two_speed_optimiser_and_routing_logs(tmp_path):
    data = toy_dataset(with_task_ids=True)
    trainer = trainer_for(
        routed("poly", n_tasks=3),
        args(tmp_path, max_steps=4, weight_decay=0.01),
        data,
        router_lr=0.05,
        eval_dataset=data.select(range(0, 24, 4)),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "allocation_spread" not in metrics  # routing logs are for training logs
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"experts", "allocation"} and groups["experts"]["weight_decay"] == 0.01
    assert groups["allocation"]["initial_lr"] == 0.05 and groups["experts"]["initial_lr"] == 1e-2
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 4
    for r in logs:  # the router's rate follows the same schedule at its own scale
        assert r["router_learning_rate"] == pytest.approx(r["learning_rate"] * 5)
        assert r["allocation_spread"] >= 0 and "aux_loss" not in r  # Poly has no auxiliary loss: no such series
    orch = trainer_for(routed("orchmoe"), args(tmp_path / "o", max_steps=2), toy_dataset(with_task_ids=True))
    orch.train()
    rec = [r for r in orch.state.log_history if "loss" in r][-1]
    assert 0 <= rec["pi_entropy"] <= 1.1 and rec["abstract_tasks_used"] in (1, 2, 3) and rec["abstract_tasks"] == 3
    assert 0 <= rec["nmi_pi_task"] <= 1  # the batches say which task each example is (never routed by it)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_aux_loss_is_added_once_scaled_like_the_lm_loss(tmp_path, accumulation):
    """With the loss normalised over the accumulated batch (num_items_in_batch), each micro-batch's auxiliary
    loss is weighted by its share of the answer tokens: a step sees its token-weighted mean once."""
    model = routed("molora", aux_loss_coef=0.5)
    data = toy_dataset()
    trainer = trainer_for(model, args(tmp_path, gradient_accumulation_steps=accumulation), data)
    batch = {k: torch.tensor(data[k][:6]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    torch.manual_seed(0)
    reference = model(**batch)  # a plain forward: the LM mean loss + the whole aux loss
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=n_items * accumulation)  # this micro-batch's share
    torch.testing.assert_close(loss, reference.loss / accumulation, atol=1e-6, rtol=1e-5)


class _Poison(TrainerCallback):
    """Makes the adapter non-finite after ``step`` (what an absurd learning rate does to a real model)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(iter(model.routed_layers.values())).lora_B.fill_(float("inf"))


def test_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path):
    data = toy_dataset()
    trainer = trainer_for(
        routed("lora"), args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4), data, callbacks=[_Poison(5)]
    )
    with pytest.raises(
        NonFiniteLossError, match=r"became nan between steps [56] and [67]: the learning rate .* too high"
    ):
        trainer.train()
    assert [int(c.name.split("-")[1]) for c in tmp_path.glob("checkpoint-*")] == [4]  # none after it went bad
    assert all(
        torch.isfinite(t).all()
        for t in load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors")).values()
    )
    poisoned = trainer_for(
        routed("lora"),
        args(tmp_path / "b", max_steps=4, logging_steps=10, save_strategy="steps", save_steps=4),
        data,
        callbacks=[_Poison(3)],
    )
    with pytest.raises(NonFiniteLossError, match="the adapter holds NaN/inf"):  # caught when a checkpoint is written
        poisoned.train()


DDP_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import adapter_of, args, routed, toy_dataset, trainer_for
torch.set_num_threads(1)
model = routed("molora")
trainer = trainer_for(model, args({out!r}, max_steps=4, per_device_train_batch_size=3, logging_steps=2,
                                  save_strategy="steps", save_steps=4, ddp_backend="gloo"), toy_dataset())
trainer.train()
world = torch.distributed.get_world_size()
digest = torch.stack([v.double().sum() for v in adapter_of(model).values()])
every = [torch.zeros_like(digest) for _ in range(world)]
torch.distributed.all_gather(every, digest)
if trainer.is_world_process_zero():
    json.dump({{"world": world, "same": all(torch.equal(every[0], d) for d in every),
               "logs": trainer.state.log_history}}, open(os.path.join({out!r}, "result.json"), "w"))
torch.distributed.destroy_process_group()  # a gloo group still open at exit can abort the process
# gloo's C++ worker threads can still be joinable when the interpreter finalizes ("terminate called without an
# active exception", SIGABRT after the work is done; seen under load even after the destroy above): the work
# and its result are written, so leave without the interpreter's teardown
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
"""


def test_two_process_ddp_with_molora_aux_loss(tmp_path):
    """torchrun, 2 CPU processes (gloo): the output with its aux_loss field crosses DDP, both processes end with the
    same adapter, the averaged aux loss is logged, and one adapter-only checkpoint is written."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path / "out")))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
    ]
    proc = launch(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["world"] == 2 and result["same"]
    logs = [r for r in result["logs"] if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4] and all(r["aux_loss"] > 0 for r in logs)
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
