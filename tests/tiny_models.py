"""Tiny random models for the tests (CPU, milliseconds): the one builder, :func:`tiny_model`.

``core_helpers.tiny_base`` is this builder at the core suite's settings; the tiny tokenizer is
``helpers_tokenizer.make_tiny_tokenizer`` (its ``<pad>``/``</s>``/``<s>`` ids are the ones below).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# Special-token ids of every tiny model (T5 convention: pad=0, eos=1), as in make_tiny_tokenizer.
TINY_PAD_ID, TINY_EOS_ID, TINY_BOS_ID = 0, 1, 2


def tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int = 128,
    width: int | None = None,
    seed: int = 0,
    init_range: float | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    global_seed: bool = False,
) -> Any:
    """Tiny randomly initialised model (2 layers, 4 heads) for tests/CI, in eval mode.

    Covers the three module layouts the LoRA injection must handle: ``llama``
    (q/k/v/o + gate/up/down Linear, GQA so k/v are not square), ``gpt2`` (fused Conv1D
    c_attn/c_proj/c_fc), ``t5`` (seq2seq, q/k/v/o + wi/wo). Dropout is 0 so train-mode tests
    are deterministic.

    ``width``: hidden size, the MLP being twice as wide (T5: ``d_kv = width // 4``); None is 64
    for llama/gpt2 and 32 for t5. ``init_range``: the config's ``initializer_range`` (None: the
    transformers default; T5 has none and ignores it). ``max_positions``: llama/gpt2 only.
    ``tie_embeddings``: the config's ``tie_word_embeddings``. The weights depend on ``seed``
    alone: with ``global_seed=False`` the global RNG is untouched; with True it is seeded with
    ``torch.manual_seed(seed)`` and left where the initialisation ends (what ``tiny_base`` does).
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if vocab_size <= TINY_BOS_ID:
        raise ValueError(f"vocab_size must be > {TINY_BOS_ID} (the special ids)")
    arch = arch.lower()
    width = width or (32 if arch == "t5" else 64)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        pad_token_id=TINY_PAD_ID,
        eos_token_id=TINY_EOS_ID,
        bos_token_id=TINY_BOS_ID,
        tie_word_embeddings=tie_embeddings,
    )
    if init_range is not None and arch != "t5":
        common["initializer_range"] = init_range
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            **common,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(
            n_embd=width,
            n_layer=2,
            n_head=4,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        cls = GPT2LMHeadModel
    elif arch == "t5":
        cfg = T5Config(
            d_model=width,
            d_kv=width // 4,
            d_ff=2 * width,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            decoder_start_token_id=TINY_PAD_ID,
            **common,
        )
        cls = T5ForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use 'llama', 'gpt2' or 't5'")
    with contextlib.nullcontext() if global_seed else torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.pad_token_id = TINY_PAD_ID
    model.generation_config.eos_token_id = TINY_EOS_ID
    if arch == "t5":
        model.generation_config.decoder_start_token_id = TINY_PAD_ID
    return model.to(dtype).eval()
