"""Shared helpers of the core test-suite: tiny random models built straight from their configs.

Import from any test module with ``from core_helpers import ...`` (tests/ is on the import path,
see ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import torch

from orchmoe import LoraConfig, MHRConfig, MoDEConfig, MoLoRAConfig, OrchMoEConfig, PolyConfig

VOCAB = 64
PAD, EOS, BOS = 0, 1, 2
N_TASKS = 3

ARCHS = ("llama", "gpt2", "t5")
METHOD_NAMES = ("lora", "molora", "poly", "mhr", "mode", "orchmoe")


def tiny_base(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer, width-32 random model in eval mode (dropout 0)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    ids = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.2,
            **ids,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=0.2,
            **ids,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "t5":
        cfg = T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            decoder_start_token_id=PAD,
            **ids,
        )
        model = T5ForConditionalGeneration(cfg)
    else:  # pragma: no cover
        raise ValueError(arch)
    model.generation_config.pad_token_id = PAD
    return model.to(dtype).eval()


def method_config(method: str, target_modules=None, **overrides):
    """A small config of each method (defaults picked so every test runs in milliseconds)."""
    base = dict(target_modules=target_modules)
    if method == "lora":
        cfg = LoraConfig(rank=4, **base)
    elif method == "molora":
        cfg = MoLoRAConfig(n_skills=4, rank=2, top_k=2, aux_loss_coef=0.01, **base)
    elif method == "poly":
        cfg = PolyConfig(n_tasks=N_TASKS, n_skills=4, rank=2, **base)
    elif method == "mhr":
        cfg = MHRConfig(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=4, **base)
    elif method == "mode":
        cfg = MoDEConfig(n_skills=3, rank=4, expert_rank=2, **base)
    elif method == "orchmoe":
        cfg = OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=3, **base)
    else:  # pragma: no cover
        raise ValueError(method)
    return cfg.replace(**overrides) if overrides else cfg


def randomize_adapter(model, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero B, spread router logits: so adapters and routing visibly change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            p.copy_((torch.randn(p.shape, generator=g) * (std if "lora" in name else 1.0)).to(p))


def task_kwargs(method: str, task_ids) -> dict:
    return {"task_ids": torch.as_tensor(task_ids)} if method in ("poly", "mhr") else {}


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
