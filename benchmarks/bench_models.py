"""Base models for the speed and serving benchmarks: a real checkpoint, or a named shape with random weights.

Throughput does not depend on the weights' values (every benchmark decodes a fixed number of tokens),
so a shape with random weights measures what the real model would, without shipping it: the GPU
check measures SmolLM2-135M's shape and a 1.3B shape that way and needs no model file for it.

    from bench_models import SHAPES, load_base
    base, tok, name = load_base(model=None, shape="1.3b", dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

# Llama shapes (tied embeddings, SmolLM2's vocabulary). smollm2-135m is SmolLM2-135M-Instruct's config;
# 1.3b is a 1.33B-parameter Llama (hidden 2048, 24 layers, MHA, SwiGLU 5632); smollm2-1.7b is SmolLM2-1.7B's
# config (1.71B); tiny is for smoke tests on a CPU.
SHAPES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
    },
    "1.3b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
    },
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "rope_theta": 130000.0,
    },
}
PAD_ID = 2  # SmolLM2's pad (= eos) id; any id < vocab works for random weights


def random_model(shape: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A LlamaForCausalLM of a named shape with random weights, built directly on ``device`` (fast on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    spec = dict(SHAPES[shape])
    theta = spec.pop("rope_theta", 10000.0)
    cfg = LlamaConfig(
        **spec,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}  # transformers 5 (ignored by 4)
    cfg.rope_theta = theta  # transformers 4
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    for p in (
        model.parameters()
    ):  # weights only: buffers (RoPE's inv_freq) stay fp32, as from_pretrained(dtype=...) leaves them
        p.data = p.data.to(dtype)
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    return model


def load_base(model: str | None, shape: str | None, dtype: torch.dtype, device: str):
    """(model, tokenizer or None, name) with every base weight frozen.

    Args:
        model: a checkpoint for ``orchmoe.loading.load_model_and_tokenizer`` (None: SmolLM2-135M-Instruct).
        shape: a key of :data:`SHAPES`: random weights of that shape instead (no tokenizer).
        dtype: dtype of the base weights.
        device: where the model lives.
    """
    if shape is not None:
        base, tok = random_model(shape, dtype, device), None
        name = f"{shape} shape, random weights"
    else:
        from orchmoe.loading.pretrained import load_model_and_tokenizer

        base, tok, info = load_model_and_tokenizer(model, dtype=dtype, device=device)
        name = info.get("name", model)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tok, name


def pad_id(tok, base) -> int:
    """The id generate() pads with: the tokenizer's, else the model's."""
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    value = getattr(base.generation_config, "pad_token_id", None) or getattr(base.config, "pad_token_id", None)
    return int(value if value is not None else 0)


def random_rows(vocab: int, n_rows: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """(n_rows, length) token ids avoiding the first few (special) ids, for models without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n_rows, length), generator=g).to(device)
