"""Tk-Instruct prompt text and its tokenisation/truncation rules."""

from __future__ import annotations

import pytest

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.data import (
    IGNORE_INDEX,
    encode_example,
    encode_prompt,
    format_prompt,
)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------
# Prompt text


def test_format_prompt_exact(make_task):
    task = make_task(definition="  Reverse the word.  ")
    expected = (
        "Definition: Reverse the word.\n\n"
        "Positive Example 1 -\nInput: word1\nOutput: out1\n\n"
        "Positive Example 2 -\nInput: word2\nOutput: out2\n\n"
        "Now complete the following example -\nInput: hello\nOutput:"
    )
    assert format_prompt(task, " hello ") == expected
    assert format_prompt(task, "hello", n_pos=0) == (
        "Definition: Reverse the word.\n\nNow complete the following example -\nInput: hello\nOutput:"
    )
    assert format_prompt(task, "hello", n_pos=2, definition=False) == expected.split("\n\n", 1)[1]
    assert format_prompt(task, "hello", n_pos=10).count("Positive Example") == 3  # only 3 exist


# ------------------------------------------------------------------------------------------
# Encoding


def test_decoder_only_labels_mask_exactly_the_prompt(tok, make_task):
    task = make_task()
    feat = encode_example(tok, task, "hello", "olleh")
    prompt_ids = enc(tok, format_prompt(task, "hello"))
    answer_ids = enc(tok, " olleh") + [tok.eos_token_id]
    assert feat["input_ids"] == prompt_ids + answer_ids
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert feat["attention_mask"] == [1] * len(feat["input_ids"])
    assert tok.decode(feat["input_ids"]).endswith("Output: olleh</s>")
    # the generation prompt is exactly the part that training masks out
    assert encode_prompt(tok, task, "hello") == prompt_ids


def test_bos_once_and_no_eos_inside_decoder_prompt(make_task):
    tok = make_tiny_tokenizer(add_bos=True, add_eos=True)
    task = make_task()
    feat = encode_example(tok, task, "hello", "olleh")
    assert feat["input_ids"][0] == tok.bos_token_id and feat["input_ids"].count(tok.bos_token_id) == 1
    assert feat["input_ids"].count(tok.eos_token_id) == 1 and feat["input_ids"][-1] == tok.eos_token_id
    assert feat["labels"][0] == IGNORE_INDEX


def _prompt_text(tok, task, inp, max_len):
    ids = encode_prompt(tok, task, inp, max_source_len=max_len)
    assert len(ids) <= max_len
    return tok.decode(ids)


def test_truncation_drops_examples_one_by_one_then_cuts_definition_left(tok, make_task):
    task = make_task(
        definition="alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omega", n_pos=2, pos_len=8
    )
    inp, ans = "the quick brown fox", "xof"
    full = len(enc(tok, format_prompt(task, inp, n_pos=2)))
    one = len(enc(tok, format_prompt(task, inp, n_pos=1)))
    zero = len(enc(tok, format_prompt(task, inp, n_pos=0)))
    assert full > one > zero

    assert _prompt_text(tok, task, inp, full) == format_prompt(task, inp, n_pos=2)
    assert _prompt_text(tok, task, inp, full - 1) == format_prompt(task, inp, n_pos=1)
    assert _prompt_text(tok, task, inp, one - 1) == format_prompt(task, inp, n_pos=0)

    text = _prompt_text(tok, task, inp, zero - 4)  # now the definition must lose its start
    assert "Positive Example" not in text
    assert text.startswith("Definition:") and "alpha" not in text and "omega" in text
    assert text.endswith("Now complete the following example -\nInput: the quick brown fox\nOutput:")

    feat = encode_example(tok, task, inp, ans, max_source_len=zero - 4)
    answer_ids = enc(tok, " " + ans) + [tok.eos_token_id]
    assert feat["input_ids"][-len(answer_ids) :] == answer_ids  # the answer is never cut
    n_prompt = sum(1 for x in feat["labels"] if x == IGNORE_INDEX)
    assert n_prompt <= zero - 4


def test_overlong_input_keeps_its_end(tok, make_task):
    task = make_task(n_pos=1)
    inp = " ".join(f"w{i}" for i in range(60)) + " FINALWORD"
    text = _prompt_text(tok, task, inp, 40)
    assert "Definition" not in text and "w0 " not in text
    assert text.endswith("FINALWORD\nOutput:")
    with pytest.raises(ValueError, match="too small"):
        encode_prompt(tok, task, inp, max_source_len=5)


def test_answer_truncated_to_max_target_len_keeps_eos(tok, make_task):
    task = make_task()
    long_answer = " ".join(["dlrow olleh"] * 30)
    feat = encode_example(tok, task, "hello", long_answer, max_target_len=8)
    answer = [x for x in feat["labels"] if x != IGNORE_INDEX]
    assert len(answer) == 8 and answer[-1] == tok.eos_token_id
    assert answer[:-1] == enc(tok, " " + long_answer)[:7]


def test_encoder_decoder_layout(make_task):
    tok = make_tiny_tokenizer(add_eos=True)  # T5-style: the tokenizer appends </s>
    task = make_task()
    feat = encode_example(tok, task, "hello", "olleh", decoder_only=False)
    assert feat["input_ids"] == tok(format_prompt(task, "hello"))["input_ids"]
    assert feat["input_ids"][-1] == tok.eos_token_id
    assert feat["labels"] == enc(tok, "olleh") + [tok.eos_token_id]  # no leading space, no -100
    assert encode_prompt(tok, task, "hello", decoder_only=False) == feat["input_ids"]


def test_chat_template_wraps_prompt_without_double_specials(make_task):
    tok = make_tiny_tokenizer(add_bos=True, chat_template=True)
    task = make_task()
    prompt = format_prompt(task, "hello")
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    feat = encode_example(tok, task, "hello", "olleh", chat_template=True)
    prompt_ids = enc(tok, chat)
    assert feat["input_ids"][: len(prompt_ids)] == prompt_ids
    assert feat["input_ids"][len(prompt_ids) :] == enc(tok, "olleh") + [tok.eos_token_id]
    assert feat["input_ids"][:2].count(tok.bos_token_id) == 1  # template BOS only, none added on top
    assert encode_prompt(tok, task, "hello", chat_template=True) == prompt_ids
    # truncation also works inside the template and keeps the assistant cue
    short = encode_prompt(tok, task, "hello", chat_template=True, max_source_len=len(prompt_ids) - 1)
    assert len(short) < len(prompt_ids) and tok.decode(short).endswith("<s>assistant\n")
