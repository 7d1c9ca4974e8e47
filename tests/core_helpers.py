"""Shared helpers of the core test-suite: the tiny base model at its settings, method configs, toy batches.

Import from any test module with ``from core_helpers import ...`` (tests/ is on the import path,
see ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import torch

from orchmoe import METHODS
from orchmoe.core.registry import config_class
from tiny_models import TINY_BOS_ID, TINY_EOS_ID, TINY_PAD_ID, tiny_model

VOCAB = 64
PAD, EOS, BOS = TINY_PAD_ID, TINY_EOS_ID, TINY_BOS_ID
N_TASKS = 3

ARCHS = ("llama", "gpt2", "t5")
#: every registered method (a new one is tested without editing the suite)
METHOD_NAMES = tuple(METHODS)

#: tolerance of two fp32 computations of the same function along different paths (another operation order,
#: another matmul shape): x86 CPUs (AMD EPYC vs Intel Xeon) pick different kernels and differ in the last bits
#: (1.9e-6 seen on logits of ~1), so an absolute 1e-6 alone is host-dependent
CROSS_PATH = {"atol": 1e-5, "rtol": 1e-4}


def tiny_base(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """:func:`tiny_models.tiny_model` at the core suite's settings: a 2-layer, width-32 random model of
    vocabulary :data:`VOCAB` in eval mode (dropout 0), 128 positions, ``initializer_range`` 0.2 (weights large
    enough that adapters and routing move the logits), untied Llama embeddings. Like it always has, it seeds
    the global RNG with ``torch.manual_seed(seed)`` (and leaves it advanced by the initialisation)."""
    return tiny_model(
        arch,
        vocab_size=VOCAB,
        width=32,
        seed=seed,
        init_range=0.2,
        max_positions=128,
        tie_embeddings=arch != "llama",
        dtype=dtype,
        global_seed=True,
    )


def method_config(method: str, target_modules=None, **overrides):
    """The registry's small config of each method (`AdapterConfig.small`: every test runs in milliseconds) for
    the suite's `N_TASKS` tasks."""
    n_tasks = overrides.pop("n_tasks", N_TASKS)
    return config_class(method).small(n_tasks, target_modules=target_modules, **overrides)


def randomize_adapter(model, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero B, spread router logits: so adapters and routing visibly change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            p.copy_((torch.randn(p.shape, generator=g) * (std if "lora" in name else 1.0)).to(p))


def task_kwargs(method: str, task_ids) -> dict:
    return {"task_ids": torch.as_tensor(task_ids)} if config_class(method).routing == "task_ids" else {}


def toy_batch(arch: str, n_per_task: int = 4, seed: int = 0):
    """3 synthetic tasks: prompt = task marker token + random tokens; answer = a fixed 2-token string per task.

    Decoder-only: input_ids = prompt + answer, labels -100 on the prompt. T5: labels = answer.
    Returns (batch dict for the model, task ids).
    """
    g = torch.Generator().manual_seed(seed)
    answers = [[10, 11], [20, 21], [30, 31]]
    prompts, labels_, tasks = [], [], []
    for t in range(N_TASKS):
        for _ in range(n_per_task):
            body = torch.randint(40, VOCAB, (5,), generator=g).tolist()
            prompts.append([3 + t, 3 + t] + body)
            labels_.append(answers[t])
            tasks.append(t)
    prompts_t = torch.tensor(prompts)
    answers_t = torch.tensor(labels_)
    task_ids = torch.tensor(tasks)
    if arch == "t5":
        batch = {"input_ids": prompts_t, "attention_mask": torch.ones_like(prompts_t), "labels": answers_t}
    else:
        ids = torch.cat([prompts_t, answers_t], 1)
        labels = ids.clone()
        labels[:, : prompts_t.shape[1]] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return batch, task_ids


def decoder_inputs(model, batch) -> dict:
    """An encoder-decoder's ``decoder_input_ids`` for a batch (its labels, -100 as 0); nothing for a decoder."""
    return {"decoder_input_ids": batch["labels"].clamp_min(0)} if model.config.is_encoder_decoder else {}


def lm_logits(model, batch, **kw):
    """The model's logits on a batch (labels left out, so no loss), without gradients."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, **decoder_inputs(model, batch), **kw).logits
