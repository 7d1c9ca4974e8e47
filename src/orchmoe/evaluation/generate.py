"""Batched greedy generation for evaluation: each prompt built exactly as in training, routed by the model.

Prompts are built with the adapter's prompt format (same demonstrations, token budget, chat template),
left-padded and sorted by length so a batch wastes little compute; each prompt's routing is computed once
from the prompt by ``generate`` and held for every decoding step. Poly/MHR get the seen task's id and -1
(the mean allocation) for an unseen task; the other methods route from the input alone. With several
processes each takes every W-th batch and the predictions are gathered.
"""

from __future__ import annotations

import torch

from orchmoe.data import encode_prompt, pad_batch, quiet_length_warning

__all__ = ["generate_predictions", "greedy_settings", "decode_new_tokens", "process_batches"]


def _gather(obj: list, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


def process_batches(batches: list[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This process's generation batches, as (example indices, keep): every W-th batch, then repeats of the last
    (shortest) batch with keep=False until every process has the same number of ``generate()`` calls.

    Equal counts matter under FSDP, where each decoding step all-gathers the sharded blocks on every process:
    a process that stopped early would leave the others waiting forever. The repeats' outputs are dropped.
    """
    if not batches:
        return []
    per_process = -(-len(batches) // world)  # ceil
    mine = [(b, True) for b in batches[rank::world]]
    return mine + [(batches[-1], False)] * (per_process - len(mine))


@torch.no_grad()
def generate_predictions(
    model,
    tokenizer,
    examples,
    task_defs,
    *,
    n_pos: int = 2,
    max_source_len: int = 512,
    max_new_tokens: int = 64,
    chat_template: bool = False,
    decoder_only: bool = True,
    batch_size: int = 16,
    accelerator=None,
    progress: bool = True,
) -> list[str]:
    """Greedy predictions for `examples` (in their order), decoded from the new tokens only and stripped.

    Batches are cut from the prompts sorted longest first; with several processes each takes
    every W-th batch (all processes making the same number of ``generate()`` calls, `process_batches`)
    and the predictions are gathered.
    """
    from tqdm.auto import tqdm

    if not examples:
        return []
    quiet_length_warning(tokenizer)
    routed = model
    needs_task_ids = routed.peft_config["default"].needs_task_ids if hasattr(routed, "peft_config") else False
    prompts = [
        encode_prompt(
            tokenizer,
            task_defs[ex.task],
            ex.input,
            n_pos=n_pos,
            max_source_len=max_source_len,
            decoder_only=decoder_only,
            chat_template=chat_template,
        )
        for ex in examples
    ]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = process_batches(batches, rank, world)
    device = next(routed.parameters()).device
    gen_kwargs = greedy_settings(tokenizer, max_new_tokens)
    pad = gen_kwargs["pad_token_id"]
    was_training = routed.training
    routed.eval()
    results: list[tuple[int, str]] = []
    show = progress and (accelerator is None or accelerator.is_main_process)
    bar = tqdm(total=len(examples), desc="generate", unit="ex", dynamic_ncols=True, disable=not show)
    try:
        for idx, keep in mine:
            feats = [{"input_ids": prompts[i]} for i in idx]
            batch = pad_batch(feats, pad, "left", decoder_only=True)
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            kwargs = dict(gen_kwargs)
            if needs_task_ids:
                kwargs["task_ids"] = torch.tensor([examples[i].task_id for i in idx], device=device)  # -1: unseen
            seqs = routed.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if not keep:
                continue  # a repeat that keeps this process in step with the others
            new = seqs[:, input_ids.shape[1] :] if decoder_only else seqs
            start = None if decoder_only else routed.generation_config.decoder_start_token_id
            results += zip(idx, decode_new_tokens(tokenizer, new, start))
            bar.update(len(idx) * world)
    finally:
        bar.close()
        routed.train(was_training)
    gathered = _gather(results, accelerator)
    preds: list[str | None] = [None] * len(examples)
    for i, p in gathered:
        preds[i] = p
    if any(p is None for p in preds):
        raise RuntimeError("a prediction went missing while gathering the processes' predictions")
    return preds  # type: ignore[return-value]


def greedy_settings(tokenizer, max_new_tokens: int) -> dict:
    """generate() settings of the evaluation: greedy, stop at eos, pad with the pad token (eos without one)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None)  # fmt: skip


def decode_new_tokens(tokenizer, new_tokens: torch.Tensor, start: int | None) -> list[str]:
    """Each row's text up to its eos (an encoder-decoder's decoder start token dropped), stripped."""
    eos, out = tokenizer.eos_token_id, []
    for row in new_tokens.tolist():
        if start is not None and row and row[0] == start:
            row = row[1:]
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out
