"""`orchmoe.RoutedTrainer` with the real `transformers.Trainer`: adapter-only checkpoints on a
tied-embedding base, bit-exact resume, reload with `load_adapter`, the two-speed optimiser, the
auxiliary loss scaled like the LM loss, routing diagnostics in the logs, and 2-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core_helpers import method_config
from orchmoe import RoutedTrainer, get_model, load_adapter
from tiny_models import tiny_model

TESTS = Path(__file__).resolve().parent
VOCAB = 128


def toy_dataset(n_per_task: int = 8, seed: int = 0, with_task_ids: bool = False):
    """3 tasks: prompt = a task marker + random tokens, answer = a fixed 3-token string per task."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    if with_task_ids:
        rows["task_ids"] = []
    for t in range(3):
        for _ in range(n_per_task):
            prompt = [4 + t] + torch.randint(40, VOCAB, (6,), generator=g).tolist()
            answer = [10 + 5 * t, 11 + 5 * t, 12 + 5 * t]
            rows["input_ids"].append(prompt + answer)
            rows["attention_mask"].append([1] * 10)
            rows["labels"].append([-100] * len(prompt) + answer)
            if with_task_ids:
                rows["task_ids"].append(t)
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
    )
    base.update(kw)
    return TrainingArguments(**base)


def adapter_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in {**model.adapter_state_dict(), **model.adapter_buffers()}.items()}


def test_checkpoints_are_adapter_only_and_resume_bit_exactly(tmp_path):
    data = toy_dataset()
    full = routed("orchmoe")
    trainer = RoutedTrainer(
        model=full, args=args(tmp_path / "a", save_strategy="steps", save_steps=3), train_dataset=data
    )
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names  # no frozen base weights
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_of(full)) and not any("embed_tokens" in k for k in saved)

    # a second run, killed after checkpoint-3 (here: a fresh model and trainer), resumes to the same adapter
    resumed = routed("orchmoe", seed=1)  # another initialisation: everything must come from the checkpoint
    t2 = RoutedTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=data)
    t2.train(resume_from_checkpoint=str(ckpt))
    a, b = adapter_of(full), adapter_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    after = [[r["loss"] for r in t.state.log_history if "loss" in r and r["step"] > 3] for t in (trainer, t2)]
    assert after[0] == after[1] and len(after[0]) == 3  # the resumed run logs the same losses

    # the last checkpoint and save_model() are adapter folders that load_adapter reads
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.tensor(data["input_ids"][:4])
    full.eval()
    with torch.no_grad():
        expected = full(input_ids=ids).logits
    for folder in (tmp_path / "final", tmp_path / "a" / "checkpoint-6"):
        loaded = load_adapter(tiny_model("llama", vocab_size=VOCAB), folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_resume_rejects_a_checkpoint_of_another_adapter(tmp_path):
    data = toy_dataset()
    RoutedTrainer(
        model=routed("lora"),
        args=args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data,
    ).train()
    other = RoutedTrainer(model=routed("lora", rank=2), args=args(tmp_path / "b", max_steps=2), train_dataset=data)
    with pytest.raises(ValueError, match="other settings.*rank"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_two_speed_optimiser_and_routing_logs(tmp_path):
    data = toy_dataset(with_task_ids=True)
    trainer = RoutedTrainer(
        model=routed("poly", n_tasks=3),
        args=args(tmp_path, max_steps=4, weight_decay=0.01),
        train_dataset=data,
        eval_dataset=data.select(range(0, 24, 4)),
        router_lr=0.05,
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
        assert r["allocation_spread"] >= 0
    orch = RoutedTrainer(
        model=routed("orchmoe"), args=args(tmp_path / "o", max_steps=2), train_dataset=toy_dataset(with_task_ids=True)
    )
    orch.train()
    rec = [r for r in orch.state.log_history if "loss" in r][-1]
    assert 0 <= rec["pi_entropy"] <= rec["pi_entropy_max"] and 0 < rec["abstract_tasks_used"] <= 1
    assert 0 <= rec["nmi_pi_task"] <= 1  # the batches carry task_ids


@pytest.mark.parametrize("accumulation", [1, 2])
def test_aux_loss_is_added_once_scaled_like_the_lm_loss(tmp_path, accumulation):
    """With the loss normalised over the accumulated batch (num_items_in_batch), Trainer does not divide by the
    accumulation steps: the balance loss is divided here instead, so each optimiser step sees its mean once."""
    model = routed("molora", aux_loss_coef=0.5)
    data = toy_dataset()
    trainer = RoutedTrainer(
        model=model, args=args(tmp_path, gradient_accumulation_steps=accumulation), train_dataset=data
    )
    batch = {k: torch.tensor(data[k][:6]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    reference = model(**batch)  # our forward: LM mean loss + aux
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    trainer.current_gradient_accumulation_steps = accumulation
    loss = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
    expected = reference.loss - reference.aux_loss + reference.aux_loss / accumulation
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert trainer.routing_logs()["aux_loss"] == pytest.approx(reference.aux_loss.item())


DDP_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_routed_trainer import args, routed, toy_dataset, adapter_of
from orchmoe import RoutedTrainer
torch.set_num_threads(1)
model = routed("molora")
trainer = RoutedTrainer(model=model, args=args({out!r}, max_steps=4, per_device_train_batch_size=3, logging_steps=2,
                                               save_strategy="steps", save_steps=4, ddp_backend="gloo"),
                        train_dataset=toy_dataset())
trainer.train()
world = torch.distributed.get_world_size()
digest = torch.stack([v.double().sum() for v in adapter_of(model).values()])
every = [torch.zeros_like(digest) for _ in range(world)]
torch.distributed.all_gather(every, digest)
if trainer.is_world_process_zero():
    json.dump({{"world": world, "same": all(torch.equal(every[0], d) for d in every),
               "logs": trainer.state.log_history}}, open(os.path.join({out!r}, "result.json"), "w"))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_with_molora_aux_loss(tmp_path):
    """torchrun, 2 CPU processes (gloo): the output with its aux_loss field crosses DDP, both processes end with the
    same adapter, the averaged aux loss is logged, and one adapter-only checkpoint is written."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path / "out")))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["world"] == 2 and result["same"]
    logs = [r for r in result["logs"] if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4] and all(r["aux_loss"] > 0 for r in logs)
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
