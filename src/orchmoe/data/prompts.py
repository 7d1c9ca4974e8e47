"""Tk-Instruct prompts and their tokenisation with the SuperNI truncation rules (padding: :mod:`orchmoe.data.batching`).

Prompt (``definition + k positive examples``, k = 2 by default, as in Tk-Instruct)::

    Definition: {definition}

    Positive Example 1 -
    Input: {input}
    Output: {output}

    Now complete the following example -
    Input: {input}
    Output:

When a prompt is over the token budget, demonstrations are dropped one at a time (k, k-1, ..., 0);
if it is still too long, the definition loses tokens from its left side, then (only if the
input alone is over budget) the input loses tokens from its left side. The end of the input and
the ``Output:`` cue are never cut, and neither is the answer (beyond ``max_target_len``).

Decoder-only models are trained on ``prompt + " " + answer + eos`` with the loss only on the
answer; encoder-decoder models get the prompt as encoder input and ``answer + eos`` as labels.
"""

from __future__ import annotations

import weakref
from typing import Any

IGNORE_INDEX = -100
_CHAT_SENTINEL = "\u2063ORCHMOE_PROMPT_SLOT\u2063"
_QUERY_HEAD = "Now complete the following example -\nInput:"
_OUTPUT_CUE = "\nOutput:"


# --------------------------------------------------------------------------------------------
# Prompt text


def _definition(task: Any) -> str:
    d = task.definition
    if isinstance(d, (list, tuple)):
        d = " ".join(s.strip() for s in d)
    return str(d).strip()


def format_prompt(task: Any, input_text: str, n_pos: int = 2, definition: bool = True) -> str:
    """The Tk-Instruct prompt for one input of ``task`` (a :class:`SuperNITask` or any object with
    ``definition`` and ``positive_examples``). Uses at most ``n_pos`` demonstrations."""
    if n_pos < 0:
        raise ValueError(f"n_pos must be >= 0, got {n_pos}")
    parts = []
    d = _definition(task) if definition else ""
    if d:
        parts.append(f"Definition: {d}\n\n")
    for i, ex in enumerate(task.positive_examples[:n_pos]):
        out = ex["output"][0] if isinstance(ex["output"], (list, tuple)) else ex["output"]
        parts.append(f"Positive Example {i + 1} -\nInput: {str(ex['input']).strip()}\nOutput: {str(out).strip()}\n\n")
    parts.append(f"{_QUERY_HEAD} {input_text.strip()}{_OUTPUT_CUE}")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Tokenisation


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_AFFIX_CACHE: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _cached(tokenizer: Any, key: str, compute) -> Any:
    """Per-tokenizer memo (the affixes are needed for every example; computing them costs 2-3
    tokenizer calls). Falls back to recomputing for objects that cannot be weak-referenced."""
    try:
        slot = _AFFIX_CACHE.setdefault(tokenizer, {})
    except TypeError:
        return compute(tokenizer)
    if key not in slot:
        slot[key] = compute(tokenizer)
    return slot[key]


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer adds around a text (e.g. BOS before, T5's EOS after).

    Found by encoding a probe with and without special tokens, so it works for any tokenizer.
    """
    return _cached(tokenizer, "special", _computespecial_affixes)


def _computespecial_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    probe = "orchmoe probe"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = _enc(tokenizer, probe)
    n = len(plain)
    for start in range(len(with_sp) - n + 1):
        if with_sp[start : start + n] == plain:
            return with_sp[:start], with_sp[start + n :]
    return [], []  # exotic post-processor: add nothing rather than guess


def _chat_affixes(tokenizer: Any) -> tuple[str, str]:
    """Text the chat template puts before and after the user message (with generation prompt)."""
    # keyed by the template text too, so assigning a new template is picked up
    return _cached(tokenizer, f"chat:{getattr(tokenizer, 'chat_template', None)}", _compute_chat_affixes)


def _compute_chat_affixes(tokenizer: Any) -> tuple[str, str]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CHAT_SENTINEL}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(rendered, str) or rendered.count(_CHAT_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not render the user message verbatim")
    pre, post = rendered.split(_CHAT_SENTINEL)
    return pre, post


def quiet_length_warning(tokenizer: Any) -> None:
    """Silence transformers' "sequence longer than the maximum" warning: prompts are tokenised whole and then
    cut to ``max_source_len`` by the prompt builder, so the warning is a false alarm."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (the model must learn where answers stop)")
    return int(eos)


def _prompt_ids(
    tokenizer: Any,
    task: Any,
    input_text: str,
    *,
    n_pos: int,
    max_source_len: int,
    decoder_only: bool,
    chat_template: bool,
    definition: bool,
) -> list[int]:
    if chat_template:
        if not decoder_only:
            raise ValueError("chat_template=True is only meaningful for decoder-only models")
        pre_text, post_text = _chat_affixes(tokenizer)
        sp_pre, sp_post = [], []  # the template text already carries BOS etc.; never add them twice
    else:
        pre_text = post_text = ""
        sp_pre, sp_post = special_affixes(tokenizer)
        if decoder_only:
            sp_post = []  # an EOS between prompt and answer would teach the model to stop
    budget = max_source_len - len(sp_pre) - len(sp_post)

    # 1) Whole-string tokenisation, dropping demonstrations one at a time.
    for k in range(min(n_pos, len(task.positive_examples)), -1, -1):
        ids = _enc(tokenizer, pre_text + format_prompt(task, input_text, n_pos=k, definition=definition) + post_text)
        if len(ids) <= budget:
            return sp_pre + ids + sp_post

    # 2) No demonstrations and still too long: cut the definition, then the input, from the left.
    #    Pieces are tokenised separately; " "-prefixed pieces mirror how BPE splits the full text.
    pre, post = (_enc(tokenizer, pre_text) if pre_text else []), (_enc(tokenizer, post_text) if post_text else [])
    inp = _enc(tokenizer, " " + input_text.strip())
    cue = _enc(tokenizer, _OUTPUT_CUE)
    d = _definition(task) if definition else ""
    if d:
        head = _enc(tokenizer, "Definition:")
        def_ids = _enc(tokenizer, " " + d)
        query = _enc(tokenizer, "\n\n" + _QUERY_HEAD)
        room = budget - len(pre) - len(post) - len(head) - len(query) - len(inp) - len(cue)
        if room > 0:
            body = head + def_ids[-room:] + query + inp + cue
            return sp_pre + pre + body + post + sp_post
    query = _enc(tokenizer, _QUERY_HEAD)
    room = budget - len(pre) - len(post) - len(query) - len(cue)
    if room <= 0:
        raise ValueError(
            f"max_source_len={max_source_len} is too small to hold even the prompt scaffolding "
            f"({max_source_len - room + 1} tokens needed for a one-token input)"
        )
    return sp_pre + pre + query + inp[-room:] + cue + post + sp_post


def encode_prompt(
    tokenizer: Any,
    task: Any,
    input_text: str,
    *,
    n_pos: int = 2,
    max_source_len: int = 512,
    decoder_only: bool = True,
    chat_template: bool = False,
    definition: bool = True,
) -> list[int]:
    """Token ids of the prompt alone, for generation (identical to the prompt part that
    :func:`encode_example` trains on, so train and test see the same tokens)."""
    return _prompt_ids(
        tokenizer,
        task,
        input_text,
        n_pos=n_pos,
        max_source_len=max_source_len,
        decoder_only=decoder_only,
        chat_template=chat_template,
        definition=definition,
    )


def encode_answer(
    tokenizer: Any, answer: str, *, max_target_len: int = 64, decoder_only: bool = True, chat_template: bool = False
) -> list[int]:
    """Answer ids + eos, cut to ``max_target_len`` tokens in all (eos always kept).

    Decoder-only prompts end with ``Output:``, so the answer gets a leading space (as it would
    in running text); after a chat template's assistant header it does not.
    """
    if max_target_len < 1:
        raise ValueError(f"max_target_len must be >= 1, got {max_target_len}")
    text = answer.strip()
    if decoder_only and not chat_template:
        text = " " + text
    return _enc(tokenizer, text)[: max_target_len - 1] + [_eos_id(tokenizer)]


def encode_example(
    tokenizer: Any,
    task: Any,
    input_text: str,
    answer: str,
    *,
    n_pos: int = 2,
    max_source_len: int = 512,
    max_target_len: int = 64,
    decoder_only: bool = True,
    chat_template: bool = False,
    definition: bool = True,
) -> dict[str, list[int]]:
    """Training features for one example: ``input_ids``, ``attention_mask``, ``labels`` (lists).

    Decoder-only: ``input_ids = prompt + answer + eos`` and ``labels`` is -100 on every prompt
    token (loss on the answer and eos only). Encoder-decoder: ``input_ids`` is the prompt and
    ``labels = answer + eos``. ``len(prompt) <= max_source_len`` and ``len(answer+eos) <= max_target_len``.
    """
    prompt = _prompt_ids(
        tokenizer,
        task,
        input_text,
        n_pos=n_pos,
        max_source_len=max_source_len,
        decoder_only=decoder_only,
        chat_template=chat_template,
        definition=definition,
    )
    ans = encode_answer(
        tokenizer, answer, max_target_len=max_target_len, decoder_only=decoder_only, chat_template=chat_template
    )
    if decoder_only:
        ids = prompt + ans
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + ans}
    return {"input_ids": prompt, "attention_mask": [1] * len(prompt), "labels": ans}
