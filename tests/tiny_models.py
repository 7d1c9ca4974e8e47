"""Tiny random models and a word-level tokenizer for the tests (CPU, milliseconds)."""

from __future__ import annotations

from typing import Any

import torch

# Special-token ids shared by tiny_model and tiny_tokenizer (T5 convention: pad=0, eos=1).
TINY_PAD_ID, TINY_EOS_ID, TINY_BOS_ID, TINY_UNK_ID = 0, 1, 2, 3
_TINY_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]


def tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0) -> Any:
    """Tiny randomly initialised model (2 layers) for tests/CI, in eval mode, fp32.

    Covers the three module layouts the LoRA injection must handle: ``llama``
    (q/k/v/o + gate/up/down Linear, GQA so k/v are not square, tied embeddings),
    ``gpt2`` (fused Conv1D c_attn/c_proj/c_fc), ``t5`` (seq2seq, q/k/v/o + wi/wo).
    Dropout is 0 so train-mode tests are deterministic.  The global RNG is untouched.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if vocab_size < len(_TINY_SPECIALS):
        raise ValueError(f"vocab_size must be >= {len(_TINY_SPECIALS)}")
    ids = dict(pad_token_id=TINY_PAD_ID, eos_token_id=TINY_EOS_ID, bos_token_id=TINY_BOS_ID)
    arch = arch.lower()
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **ids,
        )
        cls = GPT2LMHeadModel
    elif arch == "t5":
        cfg = T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            decoder_start_token_id=TINY_PAD_ID,
            **ids,
        )
        cls = T5ForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use 'llama', 'gpt2' or 't5'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.pad_token_id = TINY_PAD_ID
    model.generation_config.eos_token_id = TINY_EOS_ID
    if arch == "t5":
        model.generation_config.decoder_start_token_id = TINY_PAD_ID
    return model.eval()


_TINY_WORDS = (
    "the a an is are was of to in and or not yes no what which who where when how "
    "question answer input output task label true false positive negative translate "
    "summarize sentence word number capital france paris text . , ? ! : ; ' \" ( ) -"
).split()


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """Word-level fast tokenizer matching :func:`tiny_model`'s special ids.

    Lower-cased whitespace/punctuation split; vocab = specials, digits, letters, a
    few task words, then ``w<i>`` fillers up to ``vocab_size``; OOV -> ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list: list[str] = list(_TINY_SPECIALS)
    for tok in [str(d) for d in range(10)] + [chr(c) for c in range(97, 123)] + _TINY_WORDS:
        if tok not in vocab_list:
            vocab_list.append(tok)
    vocab_list = vocab_list[:vocab_size]
    i = 0
    while len(vocab_list) < vocab_size:
        vocab_list.append(f"w{i}")
        i += 1
    backend = Tokenizer(models.WordLevel({t: j for j, t in enumerate(vocab_list)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    return tok
