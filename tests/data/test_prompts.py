"""Tk-Instruct prompt text, tokenisation/truncation rules, padding and length-grouped batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.data import (
    IGNORE_INDEX,
    SuperNITask,
    encode_example,
    encode_prompt,
    format_prompt,
    length_grouped_batches,
    pad_batch,
)


def make_task(definition="Reverse the word.", n_pos=3, pos_len=1):
    examples = [
        {"input": f" word{i} " + "filler " * (pos_len - 1), "output": f" out{i} ", "explanation": "because"}
        for i in range(1, n_pos + 1)
    ]
    return SuperNITask(
        name="t",
        definition=definition,
        positive_examples=examples,
        categories=["Misc."],
        instances=[{"id": "t-0", "input": "abc", "output": ["cba"]}],
    )


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------
# Prompt text


def test_format_prompt_exact():
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


def test_decoder_only_labels_mask_exactly_the_prompt(tok):
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


def test_bos_once_and_no_eos_inside_decoder_prompt():
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


def test_truncation_drops_examples_one_by_one_then_cuts_definition_left(tok):
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


def test_overlong_input_keeps_its_end(tok):
    task = make_task(n_pos=1)
    inp = " ".join(f"w{i}" for i in range(60)) + " FINALWORD"
    text = _prompt_text(tok, task, inp, 40)
    assert "Definition" not in text and "w0 " not in text
    assert text.endswith("FINALWORD\nOutput:")
    with pytest.raises(ValueError, match="too small"):
        encode_prompt(tok, task, inp, max_source_len=5)


def test_answer_truncated_to_max_target_len_keeps_eos(tok):
    task = make_task()
    long_answer = " ".join(["dlrow olleh"] * 30)
    feat = encode_example(tok, task, "hello", long_answer, max_target_len=8)
    answer = [x for x in feat["labels"] if x != IGNORE_INDEX]
    assert len(answer) == 8 and answer[-1] == tok.eos_token_id
    assert answer[:-1] == enc(tok, " " + long_answer)[:7]


def test_encoder_decoder_layout():
    tok = make_tiny_tokenizer(add_eos=True)  # T5-style: the tokenizer appends </s>
    task = make_task()
    feat = encode_example(tok, task, "hello", "olleh", decoder_only=False)
    assert feat["input_ids"] == tok(format_prompt(task, "hello"))["input_ids"]
    assert feat["input_ids"][-1] == tok.eos_token_id
    assert feat["labels"] == enc(tok, "olleh") + [tok.eos_token_id]  # no leading space, no -100
    assert encode_prompt(tok, task, "hello", decoder_only=False) == feat["input_ids"]


def test_chat_template_wraps_prompt_without_double_specials():
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


# ------------------------------------------------------------------------------------------
# Padding


def test_pad_batch_right_for_training(tok):
    task = make_task()
    feats = [encode_example(tok, task, "hi", "ih"), encode_example(tok, task, "a much longer input", "x y z")]
    feats[0]["task_id"], feats[1]["task_id"] = 3, 5
    batch = pad_batch(feats, tok.pad_token_id, "right")
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (max(n0, n1) - n)
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == feats[short]["labels"]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [3, 5]


def test_pad_batch_left_for_generation(tok):
    task = make_task()
    prompts = [encode_prompt(tok, task, "hi"), encode_prompt(tok, task, "a much longer input than that")]
    batch = pad_batch([{"input_ids": p, "index": i} for i, p in enumerate(prompts)], tok.pad_token_id, "left")
    width = max(map(len, prompts))
    for row, p in enumerate(prompts):
        assert batch["input_ids"][row, width - len(p) :].tolist() == p  # every prompt ends at the last column
        assert batch["attention_mask"][row].tolist() == [0] * (width - len(p)) + [1] * len(p)
    assert batch["index"].tolist() == [0, 1]
    assert "labels" not in batch


def test_pad_batch_encoder_decoder_labels_padded_separately(tok):
    task = make_task()
    feats = [
        encode_example(tok, task, "hi", "a b c d e f", decoder_only=False),
        encode_example(tok, task, "a much longer input", "x", decoder_only=False),
    ]
    batch = pad_batch(feats, tok.pad_token_id, "right", decoder_only=False)
    assert batch["labels"].shape == (2, len(feats[0]["labels"]))
    assert batch["labels"][1].tolist() == feats[1]["labels"] + [IGNORE_INDEX] * (
        len(feats[0]["labels"]) - len(feats[1]["labels"])
    )
    with pytest.raises(ValueError, match="labels of another length"):
        pad_batch(feats, tok.pad_token_id, "right", decoder_only=True)


# ------------------------------------------------------------------------------------------
# Length-grouped batches


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=0, max_size=300),
    batch_size=st.integers(1, 17),
    seed=st.integers(0, 2**16),
    mult=st.integers(1, 6),
)
def test_length_grouped_covers_every_index_once(lengths, batch_size, seed, mult):
    batches = length_grouped_batches(lengths, batch_size, seed, mega_batch_mult=mult)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1
    assert batches == length_grouped_batches(lengths, batch_size, seed, mega_batch_mult=mult)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 1000), min_size=2, max_size=200),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_length_grouped_batches_do_not_interleave_within_a_mega_batch(lengths, batch_size, seed):
    # one mega-batch holds everything: batches are then disjoint intervals of the sorted lengths
    batches = length_grouped_batches(lengths, batch_size, seed, mega_batch_mult=10_000)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    for (_lo1, hi1), (lo2, _hi2) in zip(spans, spans[1:]):
        assert hi1 <= lo2


def test_length_grouping_reduces_padding_and_depends_on_seed():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(2000)]
    bs = 8
    grouped = length_grouped_batches(lengths, bs, seed=0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    plain = [order[i : i + bs] for i in range(0, len(order), bs)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.2 * padding(plain)
    assert grouped != length_grouped_batches(lengths, bs, seed=1)
    ordered = length_grouped_batches(lengths, bs, shuffle=False)
    flat = [lengths[i] for b in ordered for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_length_grouped_ddp_shards():
    lengths = list(range(103))
    per_rank = [length_grouped_batches(lengths, 4, seed=7, num_replicas=3, rank=r) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # equal number of batches on every rank
    assert {i for b in per_rank for batch in b for i in batch} == set(range(103))
    dropped = [length_grouped_batches(lengths, 4, seed=7, num_replicas=3, rank=r, drop_last=True) for r in range(3)]
    flat = [i for b in dropped for batch in b for i in batch]
    assert len(flat) == len(set(flat)) and all(len(batch) == 4 for b in dropped for batch in b)
    assert len(per_rank[1]) == -(-26 // 3)  # 26 batches of 4 (the last short), padded to 27, 9 per rank


def test_batches_as_a_dataloader_batch_sampler_and_epochs():
    lengths = [(i * 37) % 101 for i in range(100)]
    batches = length_grouped_batches(lengths, batch_size=3, seed=0, mega_batch_mult=4)
    loader = DataLoader(list(range(len(lengths))), batch_sampler=batches, collate_fn=list)
    first = list(loader)
    assert len(first) == len(batches) == 34
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert list(loader) == first
    assert length_grouped_batches(lengths, batch_size=3, seed=1, mega_batch_mult=4) != first  # seed + epoch
