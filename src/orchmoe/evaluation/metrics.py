"""Scoring identical to the official SuperNI evaluation (``compute_metrics.py``).

* ROUGE-L and ROUGE-1 F-measure from ``rouge_score.rouge_scorer.RougeScorer(..., use_stemmer=True)``
  with its default tokenizer (lower-case, non-alphanumerics to spaces, Porter stemming of tokens
  longer than 3 characters);
* ROUGE-Lsum (what the OrchMoE paper reports): the union-LCS summary-level ROUGE-L of the same
  package over sentences. Sentences are split after ``.``, ``!`` or ``?`` followed by white space,
  and at line breaks (nltk's Punkt, which Hugging Face ``evaluate`` uses, needs a download this
  package does not assume); for one-sentence answers it equals ROUGE-L;
* exact match after lower-casing, removing ``string.punctuation`` and collapsing white space
  (articles are kept, unlike SQuAD);
* each prediction takes its best score over its references; scores are reported x100 and
  averaged over instances (overall, per task, per category, seen vs unseen tasks).

All functions here return values on the 0-100 scale.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

METRIC_NAMES = ("rougeL", "rougeLsum", "rouge1", "exact_match")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_PUNCT = frozenset(string.punctuation)
_scorer = None


def _get_scorer():
    """One shared scorer: building it (and its stemmer) per call is the slow part."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum", "rouge1"], use_stemmer=True)
    return _scorer


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, collapse white space (the official SuperNI normalisation)."""
    return " ".join("".join(ch for ch in s.lower() if ch not in _PUNCT).split())


def exact_match(pred: str, ref: str) -> float:
    """100.0 if the normalised strings (`normalize_answer`) are equal, else 0.0.

    Args:
        pred: the prediction.
        ref: one reference answer.
    """
    return 100.0 if normalize_answer(pred) == normalize_answer(ref) else 0.0


def sentences(text: str) -> str:
    """``text`` with one sentence per line: what rouge-score's ROUGE-Lsum reads as sentence boundaries."""
    return "\n".join(s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s)


def _rouge(pred: str, ref: str) -> dict[str, float]:
    # line breaks are white space to the tokenizer, so ROUGE-L and ROUGE-1 do not change with the split
    scores = _get_scorer().score(target=sentences(ref), prediction=sentences(pred))
    return {k: 100.0 * scores[k].fmeasure for k in ("rougeL", "rougeLsum", "rouge1")}


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure x100 (longest common subsequence of stemmed tokens).

    Args:
        pred: the prediction.
        ref: one reference answer.
    """
    return _rouge(pred, ref)["rougeL"]


def rouge_lsum(pred: str, ref: str) -> float:
    """ROUGE-Lsum F-measure x100 (union LCS over sentences, split as `sentences` does).

    Args:
        pred: the prediction.
        ref: one reference answer.
    """
    return _rouge(pred, ref)["rougeLsum"]


def rouge1(pred: str, ref: str) -> float:
    """ROUGE-1 F-measure x100 (unigram overlap of stemmed tokens).

    Args:
        pred: the prediction.
        ref: one reference answer.
    """
    return _rouge(pred, ref)["rouge1"]


def _refs(refs: str | Sequence[str]) -> list[str]:
    out = [refs] if isinstance(refs, str) else list(refs)
    if not out:
        raise ValueError("an example needs at least one reference")
    return out


def score_example(pred: str, refs: str | Sequence[str]) -> dict[str, float]:
    """``{"rougeL", "rougeLsum", "rouge1", "exact_match"}`` for one prediction: max over the references of
    each metric separately (as the official script does).

    Args:
        pred: the prediction (leading and trailing white space dropped).
        refs: one reference or several.
    Returns:
        The four scores, each 0-100.
    Raises:
        ValueError: no reference.
    """
    pred = pred.strip()
    best = {k: 0.0 for k in METRIC_NAMES}
    for ref in _refs(refs):
        s = _rouge(pred, ref)
        s["exact_match"] = exact_match(pred, ref)
        for k in METRIC_NAMES:
            best[k] = max(best[k], s[k])
    return best


def _mean(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    n = len(rows)
    out: dict[str, Any] = {k: sum(r[k] for r in rows) / n for k in METRIC_NAMES}
    out["n"] = n
    return out


def _summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, list] = defaultdict(list)
    by_cat: dict[str, list] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
        by_cat[r["category"]].append(r)
    return {
        "overall": _mean(rows),
        "per_task": {t: _mean(v) for t, v in sorted(by_task.items())},
        "per_category": {c: _mean(v) for c, v in sorted(by_cat.items())},
    }


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Score and average a set of predictions.

    Each record is a mapping with ``task``, ``pred``, ``refs`` (a list of references, or one
    string), optionally ``category`` (default "Unknown"), ``seen`` (default True; False for
    tasks of the unseen/test split) and ``scores`` (`score_example`'s result, when already computed).
    Returns::

        {"overall": {...}, "per_task": {task: {...}}, "per_category": {cat: {...}},
         "seen": {"overall", "per_task", "per_category"},     # only if there are seen records
         "unseen": {"overall", "per_task", "per_category"}}   # only if there are unseen records

    where every ``{...}`` is ``{"rougeL", "rougeLsum", "rouge1", "exact_match", "n"}`` averaged over instances
    (x100), as the official evaluation does.
    """
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        missing = [k for k in ("task", "pred", "refs") if k not in rec]
        if missing:
            raise KeyError(f"record {i} is missing {missing} (needs task, pred, refs; optional category, seen)")
        row = dict(rec["scores"]) if "scores" in rec else score_example(str(rec["pred"]), rec["refs"])
        row.update(task=rec["task"], category=rec.get("category") or "Unknown", seen=bool(rec.get("seen", True)))
        rows.append(row)
    if not rows:
        raise ValueError("no records to aggregate")
    result = _summarise(rows)
    for key, flag in (("seen", True), ("unseen", False)):
        part = [r for r in rows if r["seen"] is flag]
        if part:
            result[key] = _summarise(part)
    return result
