"""Does the bundle answer as the routed adapter does? Greedy answers of both, prompt by prompt.

The routed model decodes a batch with each row routed as in training (OrchMoE by its prompt, Poly/MHR by its
task id). The bundle's LoRAs are loaded by name into one `peft.PeftModel` over a fresh copy of the base
model and decode the same batch as PEFT's mixed-adapter batch (``generate(..., adapter_names=[...])``), each
row on the LoRA the bundle routes it to. With a fixed routing (Poly/MHR, LoRA, OrchMoE with hard routing)
the two compute the same function and agree up to floating-point order; with OrchMoE's soft pi the LoRA of
argmax pi drops the other abstract tasks' share, and the agreement rate says how often that changes an answer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchmoe.data import pad_batch

__all__ = ["RoutedPrompt", "check_bundle", "greedy_answers", "load_peft_loras", "stratified_pick"]


@dataclass(frozen=True)
class RoutedPrompt:
    """One prompt of the export: its tokens, and what routes it.

    Attributes:
        ids: the prompt's token ids (as built for training).
        task: its task's name, when known.
        task_id: its training task id (-1: unseen task); Poly/MHR route by it.
        split: where it came from (``train``, ``eval``, ``unseen``, ``file``).
    """

    ids: tuple[int, ...]
    task: str | None = None
    task_id: int | None = None
    split: str = ""


def greedy_kwargs(tokenizer, max_new_tokens: int) -> dict[str, Any]:
    """generate() settings of greedy decoding that stops at eos (the sampling defaults of a generation config off)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None)  # fmt: skip


def greedy_answers(
    generate: Callable[..., torch.Tensor],
    prompts: Sequence[Sequence[int]],
    gen_kwargs: dict[str, Any],
    *,
    batch_size: int,
    decoder_only: bool,
    device: torch.device | str,
) -> list[list[int]]:
    """Each prompt's greedy answer: the new tokens up to (without) eos, in the prompts' order.

    Args:
        generate: called as ``generate(rows, input_ids=..., attention_mask=..., **gen_kwargs)`` with ``rows`` the
            batch's prompt indices (so the caller adds per-row routing), returning the sequences.
        prompts: token ids of each prompt.
        gen_kwargs: `greedy_kwargs`.
        batch_size: prompts per ``generate`` call (longest first, left-padded).
        decoder_only: a decoder-only model (its output repeats the prompt) or an encoder-decoder.
        device: where the model is.
    """
    eos, pad = gen_kwargs["eos_token_id"], gen_kwargs["pad_token_id"]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        batch = pad_batch([{"input_ids": list(prompts[i])} for i in rows], pad, "left", decoder_only=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            seqs = generate(rows, input_ids=ids, attention_mask=mask, **gen_kwargs)
        new = seqs[:, ids.shape[1] :] if decoder_only else seqs[:, 1:]  # (b, new): no prompt / no decoder start
        for i, row in zip(rows, new.tolist()):
            answers[i] = row[: row.index(eos)] if eos in row else row
    return answers


def load_peft_loras(base: torch.nn.Module, loras: dict[str, str | os.PathLike]):
    """Every LoRA loaded by its name into one `peft.PeftModel` over `base` (eval mode), ready for
    ``adapter_names=`` batches.

    Raises:
        RuntimeError: peft is not installed.
    """
    try:
        from peft import PeftModel
    except ImportError as e:
        raise RuntimeError(f"loading the bundle's LoRAs needs peft (pip install 'orchmoe[export]'): {e}") from None
    names = list(loras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base's recorded name differs from the export's: expected here
        pm = PeftModel.from_pretrained(base, str(loras[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(str(loras[name]), adapter_name=name)
    return pm.eval()


def stratified_pick(rows: Sequence[str], limit: int) -> list[int]:
    """Up to `limit` prompt indices, taken in turn from each LoRA's prompts (every LoRA checked when it can be)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(rows):
        groups.setdefault(name, []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(limit, len(rows)):
        for members in groups.values():
            if depth < len(members) and len(picked) < limit:
                picked.append(members[depth])
        depth += 1
    return sorted(picked)


def check_bundle(
    model,
    base: torch.nn.Module,
    loras: dict[str, Path],
    prompts: Sequence[RoutedPrompt],
    rows: Sequence[str],
    *,
    tokenizer,
    limit: int,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """Greedy answers of the routed model against the bundle's LoRAs (PEFT mixed-adapter batch).

    Args:
        model: the `RoutedModel` exported.
        base: a fresh base model (not the one inside `model`), on the model's device.
        loras: LoRA name -> PEFT folder.
        prompts: the export's prompts; rows: each one's LoRA name.
        tokenizer: for eos and pad.
        limit: prompts compared at most (`stratified_pick`).
        max_new_tokens: answer length.
        batch_size: prompts per generate call.
    Returns:
        ``prompts``, ``answers_equal``, ``rate``, ``first_token_equal``, ``adapter_changes_answer`` (prompts whose
        routed answer differs from the base model's: the check means little when it is 0) and what was compared.
    """
    pick = stratified_pick(rows, limit)
    device = next(model.parameters()).device
    decoder_only = not getattr(getattr(base, "config", None), "is_encoder_decoder", False)
    gen = greedy_kwargs(tokenizer, max_new_tokens)
    ids = [prompts[i].ids for i in pick]
    by_task = model.adapter_config.needs_task_ids

    def ours(batch_rows, **kw):
        if by_task:
            kw["task_ids"] = torch.tensor([prompts[pick[r]].task_id for r in batch_rows], device=device)
        return model.generate(**kw)

    pm = load_peft_loras(base, {name: loras[name] for name in dict.fromkeys(rows[i] for i in pick)})

    def theirs(batch_rows, **kw):
        return pm.generate(**kw, adapter_names=[rows[pick[r]] for r in batch_rows])

    def plain(batch_rows, **kw):
        with pm.disable_adapter():
            return pm.generate(**kw)

    common = dict(batch_size=batch_size, decoder_only=decoder_only, device=device)
    a = greedy_answers(ours, ids, gen, **common)
    b = greedy_answers(theirs, ids, gen, **common)
    c = greedy_answers(plain, ids, gen, **common)
    equal = sum(x == y for x, y in zip(a, b))
    first = sum(x[:1] == y[:1] for x, y in zip(a, b))
    n = len(pick)
    return {
        "prompts": n,
        "answers_equal": equal,
        "rate": equal / n if n else None,
        "first_token_equal": first / n if n else None,
        "adapter_changes_answer": sum(x != z for x, z in zip(a, c)),
        "max_new_tokens": max_new_tokens,
        "loras_checked": len(set(rows[i] for i in pick)),
        "compared": "greedy answers (new tokens up to eos) of orchmoe's routed model vs PEFT's mixed-adapter batch "
        "of the bundle's LoRAs, each prompt on the LoRA the bundle routes it to; adapter_changes_answer: prompts "
        "whose routed answer differs from the base model's (with none, agreement says nothing)",
    }
