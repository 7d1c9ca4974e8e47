"""The prompt format saved with an adapter: it rebuilds the training prompts, the recipe writes it, and an
adapter saved without it still loads, with a warning saying what is assumed."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from helpers_tokenizer import CHAT_TEMPLATE, make_tiny_tokenizer
from orchmoe.data import PROMPT_FORMAT_KEY, PromptFormat, PromptFormatWarning, encode_prompt, format_prompt
from orchmoe.recipe.args import DataArguments

EXAMPLES = [{"input": "abc", "output": "cba"}, {"input": "hello", "output": "olleh"}]


def test_defaults_are_the_recipes_defaults():
    cfg, fmt = DataArguments(), PromptFormat()
    assert (fmt.n_pos, fmt.max_source_len, fmt.max_target_len, fmt.chat_template) == (
        cfg.n_pos,
        cfg.max_source_len,
        cfg.max_target_len,
        cfg.chat_template,
    )


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("budget", [400, 40, 25])
def test_encode_is_the_training_prompt(chat, budget):
    tok = make_tiny_tokenizer(add_bos=True)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    fmt = PromptFormat(n_pos=2, max_source_len=budget, chat_template=chat)
    task = SimpleNamespace(definition="Reverse the word.", positive_examples=EXAMPLES)
    want = encode_prompt(tok, task, "the quick brown fox", n_pos=2, max_source_len=budget, chat_template=chat)
    assert fmt.encode(tok, "Reverse the word.", "the quick brown fox", EXAMPLES) == want
    if budget == 400 and not chat:  # untruncated: the raw text of the prompt tokenises to the same ids
        assert fmt.encode_text(tok, format_prompt(task, "the quick brown fox", n_pos=2)) == want


def test_chat_needs_a_chat_trained_adapter():
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="without a chat template"):
        PromptFormat().encode_chat(tok, [{"role": "user", "content": "hi"}])
    ids = PromptFormat(chat_template=True).encode_chat(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("assistant\n")


def test_round_trip_and_bad_values():
    fmt = PromptFormat(n_pos=0, max_source_len=64, max_new_tokens=9, chat_template=True)
    assert PromptFormat.from_dict({**fmt.to_dict(), "a_newer_field": 1}) == fmt
    assert fmt.generation_tokens == 9 and PromptFormat(max_target_len=7).generation_tokens == 7
    with pytest.raises(ValueError, match="max_source_len"):
        PromptFormat(max_source_len=0)
    with pytest.raises(ValueError, match="template"):
        PromptFormat(template="alpaca")
    with pytest.raises(ValueError, match="chat_template"):
        PromptFormat(chat_template="yes")


def test_old_adapters_load_with_a_warning():
    saved = PromptFormat(n_pos=2, max_source_len=99)
    assert PromptFormat.from_adapter_metadata({PROMPT_FORMAT_KEY: saved.to_dict()}) == saved
    with pytest.warns(PromptFormatWarning, match="older orchmoe"):
        legacy = PromptFormat.from_adapter_metadata(
            {"prompt": {"n_pos": 2, "max_source_len": 99, "chat_template": False}}
        )
    assert legacy == dataclasses.replace(PromptFormat(), n_pos=2, max_source_len=99)
    with pytest.warns(PromptFormatWarning, match="defaults"):
        assert PromptFormat.from_adapter_metadata({}) == PromptFormat()


def test_the_recipe_saves_the_format_with_the_adapter(tiny_llama, superni, tmp_path):
    from orchmoe import load_adapter
    from orchmoe.cli import main
    from orchmoe.loading.pretrained import load_model_and_tokenizer
    from recipe_helpers import SMALL_DATA, tiny_train_argv

    out = tmp_path / "run"
    argv = tiny_train_argv(tiny_llama, superni, out, **{**SMALL_DATA, "n_pos": 2, "max_new_tokens": 8}, lr=None)
    assert main([*argv, "--max-steps", "1", "--no-eval"]) == 0
    base, _, _ = load_model_and_tokenizer(str(tiny_llama))
    meta = load_adapter(base, out / "adapter").adapter_metadata
    fmt = PromptFormat.from_adapter_metadata(meta)
    assert fmt == PromptFormat(
        n_pos=2, max_source_len=SMALL_DATA["max_source_len"], max_target_len=SMALL_DATA["max_target_len"],
        max_new_tokens=8, chat_template=False, decoder_only=True,
    )  # fmt: skip
