"""Tokenised training features, built with ``datasets.Dataset.map`` and cached on disk.

Why: tokenising with the SuperNI truncation rules is a Python loop over every example; on a large
protocol it costs minutes per run and per process. The features are a pure function of the
examples, the task definitions, the tokenizer and the prompt settings, so they are computed once
and stored as an Arrow file named by a fingerprint of exactly those inputs (plus the source of the
prompt code, so a change to the prompt rules never reuses stale features). A second run, or another
process of a distributed run, memory-maps that file instead of tokenising again; any change to
the data, the tokenizer or a setting gives another fingerprint, hence another file.

Under ``torch.distributed``/``accelerate``, build on the main process first
(``with accelerator.main_process_first(): ...``) so the other processes find the cache ready.

Without ``datasets`` installed (e.g. a GPU image that lacks it), the same rows are computed in memory
(:class:`FeatureRows`): no disk cache, each process tokenises for itself; the values are identical.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from orchmoe.data import prompts
from orchmoe.data.core import DataError, Example, MultiTaskData, PathLike, SuperNITask
from orchmoe.utils.fileio import cache_root

logger = logging.getLogger(__name__)

#: Bump when the feature layout changes (the prompt code's source is part of the fingerprint anyway).
FEATURES_VERSION = 1
PARTS = ("train", "eval", "unseen")


class FeatureRows(list):
    """The rows of :func:`tokenized_features` when ``datasets`` is not installed: a list of dicts that also
    answers the two ``datasets.Dataset`` members its callers use (``column_names``, ``to_list``)."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0]) if self else []

    def to_list(self) -> list[dict]:
        return [dict(row) for row in self]


def _datasets_or_none() -> Any:
    """The ``datasets`` module, or None where it cannot be imported (it is optional on the training path)."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def default_features_dir() -> Path:
    """``$ORCHMOE_CACHE/features``, else ``~/.cache/orchmoe/features``."""
    return cache_root() / "features"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything about ``tokenizer`` that changes token ids: for a fast tokenizer its
    whole ``tokenizer.json`` (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added
    tokens; not the truncation/padding state that each call resets), its special tokens and chat
    template; otherwise the ``datasets`` hash of the object. Stable across processes and across
    ``save_pretrained``/``from_pretrained``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return "obj-" + Hasher.hash(tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)  # call-time state that transformers sets per call, not ids
    spec.pop("padding", None)
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(spec, sort_keys=True).encode())
    extra = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _task_key(task: SuperNITask) -> dict[str, Any]:
    return {"definition": task.definition, "positive": task.positive_examples}


def features_fingerprint(
    examples: list[Example], task_defs: dict[str, SuperNITask], tokenizer: Any, settings: dict[str, Any]
) -> str:
    """The cache key: examples (task, task id, input, target), the definitions and demonstrations
    of their tasks, the tokenizer, the settings and the prompt code. 40 hex digits."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.task, ex.task_id, ex.input, ex.target]).encode())
        h.update(b"\x00")
    tasks = sorted({ex.task for ex in examples})
    h.update(json.dumps({t: _task_key(task_defs[t]) for t in tasks}, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps({**settings, "version": FEATURES_VERSION}, sort_keys=True).encode())
    h.update(inspect.getsource(prompts).encode())
    return h.hexdigest()[:40]


def _encode_batch(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    task_defs: dict[str, SuperNITask],
    prompt_only: bool,
    settings: dict[str, Any],
) -> dict[str, list]:
    """``Dataset.map`` function: the rows' features, exactly as :func:`encode_example` /
    :func:`encode_prompt` give them."""
    out: dict[str, list] = {
        "input_ids": [],
        "attention_mask": [],
        **({} if prompt_only else {"labels": []}),
        "task_id": [],
    }
    for task, task_id, text, target in zip(batch["task"], batch["example_task_id"], batch["input"], batch["target"]):
        if prompt_only:
            s = {k: v for k, v in settings.items() if k != "max_target_len"}
            ids = prompts.encode_prompt(tokenizer, task_defs[task], text, **s)
            f = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        else:
            f = prompts.encode_example(tokenizer, task_defs[task], text, target, **settings)
            out["labels"].append(f["labels"])
        out["input_ids"].append(f["input_ids"])
        out["attention_mask"].append(f["attention_mask"])
        out["task_id"].append(task_id)
    return out


def _in_memory(columns: dict[str, list], **kwargs: Any) -> FeatureRows:
    """The rows ``Dataset.map(_encode_batch)`` would give, computed here in one batch."""
    out = _encode_batch(columns, **kwargs)
    return FeatureRows(dict(zip(out, row)) for row in zip(*out.values()))


def tokenized_features(
    data: MultiTaskData,
    tokenizer: Any,
    *,
    n_pos: int = 2,
    max_source_len: int = 512,
    max_target_len: int = 64,
    decoder_only: bool = True,
    chat_template: bool = False,
    definition: bool = True,
    part: str = "train",
    prompt_only: bool = False,
    num_proc: int | None = None,
    cache_dir: PathLike | None = None,
) -> Any:
    """Features of one part of ``data``, tokenised once and then read from the disk cache.

    Args:
        data: the loaded protocol (:func:`orchmoe.data.load_multitask`).
        tokenizer: a Hugging Face tokenizer (it must have an eos token).
        n_pos, max_source_len, max_target_len, decoder_only, chat_template, definition: the prompt
            settings, as for :func:`orchmoe.data.encode_example`.
        part: ``"train"``, ``"eval"`` or ``"unseen"`` (which list of examples of ``data``).
        prompt_only: features for generation (:func:`orchmoe.data.encode_prompt`: no answer, no labels).
        num_proc: processes for ``Dataset.map`` (None or 1: this process).
        cache_dir: where the Arrow files go (default :func:`default_features_dir`).

    Returns:
        A ``datasets.Dataset`` with one row per example, in order, and columns ``input_ids``,
        ``attention_mask``, ``labels`` (not with ``prompt_only``) and ``task_id``: the same lists
        :func:`encode_example` gives (``task_id`` = the example's; -1 for unseen tasks). Rows index
        like a list of dicts, so the recipe's collate (:func:`orchmoe.data.pad_batch`) takes them
        as they are; ``.to_list()`` gives plain dicts. Without ``datasets``: a :class:`FeatureRows`
        of the same rows, computed in memory and not cached.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    examples: list[Example] = getattr(data, part)
    if not examples:
        raise DataError(f"no {part} examples to tokenise")
    settings = {
        "n_pos": n_pos,
        "max_source_len": max_source_len,
        "max_target_len": max_target_len,
        "decoder_only": decoder_only,
        "chat_template": chat_template,
        "definition": definition,
    }
    defs = {t: data.task_defs[t] for t in {ex.task for ex in examples}}
    columns = {
        "task": [ex.task for ex in examples],
        "example_task_id": [ex.task_id for ex in examples],
        "input": [ex.input for ex in examples],
        "target": [ex.target for ex in examples],
    }
    datasets = _datasets_or_none()
    if datasets is None:
        logger.info(
            "datasets is not installed: tokenising %d %s examples in memory (no disk cache)", len(examples), part
        )
        out = _encode_batch(columns, tokenizer=tokenizer, task_defs=defs, prompt_only=prompt_only, settings=settings)
        return FeatureRows(dict(zip(out, row)) for row in zip(*out.values()))
    fingerprint = features_fingerprint(examples, data.task_defs, tokenizer, {**settings, "prompt_only": prompt_only})
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_features_dir()
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict(columns)
    return table.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=table.column_names,
        fn_kwargs={"tokenizer": tokenizer, "task_defs": defs, "prompt_only": prompt_only, "settings": settings},
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        cache_file_name=str(folder / f"{part}-{fingerprint}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=fingerprint,
        desc=f"tokenize {part}",
    )
