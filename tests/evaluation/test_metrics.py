"""SuperNI scoring against hand-computed values."""

from __future__ import annotations

import pytest

from orchmoe.evaluation.metrics import aggregate, exact_match, normalize_answer, rouge1, rouge_l, score_example


def f1(p, r):
    return 100 * 2 * p * r / (p + r)


def test_exact_match_normalisation():
    assert normalize_answer("  The  Answer!\tis, 42. ") == "the answer is 42"
    assert exact_match("The Answer!", "the answer") == 100.0
    assert exact_match("the  answer\n", "the answer") == 100.0
    assert exact_match("an answer", "answer") == 0.0  # articles are kept (unlike SQuAD)
    assert exact_match("run", "running") == 0.0  # no stemming in exact match
    assert exact_match("", "") == 100.0


def test_rouge_l_known_lcs_pair():
    # pred: the quick brown fox (4 tokens); ref: the brown quick dog fox (5 tokens)
    # LCS = "the quick fox" (or "the brown fox"): 3 tokens -> P = 3/4, R = 3/5
    assert rouge_l("the quick brown fox", "the brown quick dog fox") == pytest.approx(f1(3 / 4, 3 / 5))
    # ROUGE-1: all 4 prediction unigrams occur in the reference -> P = 4/4, R = 4/5
    assert rouge1("the quick brown fox", "the brown quick dog fox") == pytest.approx(f1(1.0, 4 / 5))


def test_rouge_stemming_case_and_punctuation():
    assert rouge_l("running", "run") == 100.0  # Porter stemmer: running -> run
    assert rouge_l("The cats are RUNNING!", "the cat are running") == 100.0
    # 'is' vs 'are' differ: LCS = the cat run(ning), 3 of 4 tokens on both sides
    assert rouge_l("The cats are running", "the cat is running") == pytest.approx(f1(3 / 4, 3 / 4))
    assert rouge_l("", "something") == 0.0
    assert rouge_l("completely different", "nothing shared") == 0.0


def test_score_example_takes_max_over_references_per_metric():
    s = score_example("blue car", ["red car", "Blue car."])
    assert s == {"rougeL": 100.0, "rougeLsum": 100.0, "rouge1": 100.0, "exact_match": 100.0}
    s = score_example("a b c", ["a b c d", "x"])
    assert s["exact_match"] == 0.0
    assert s["rougeL"] == pytest.approx(f1(1.0, 3 / 4))
    assert score_example(" positive\n", "positive")["exact_match"] == 100.0  # a string reference is fine
    with pytest.raises(ValueError):
        score_example("x", [])


def test_aggregate_overall_task_category_and_seen_unseen():
    records = [
        {"task": "t1", "category": "A", "pred": "yes", "refs": ["yes"], "seen": True},
        {"task": "t1", "category": "A", "pred": "no", "refs": ["yes"], "seen": True},
        {
            "task": "t2",
            "category": "A",
            "pred": "the quick brown fox",
            "refs": ["the brown quick dog fox"],
            "seen": True,
        },
        {"task": "t3", "category": "B", "pred": "running", "refs": ["run", "walk"], "seen": False},
    ]
    rl_t2 = f1(3 / 4, 3 / 5)
    r1_t2 = f1(1.0, 4 / 5)
    res = aggregate(records)
    assert res["overall"]["n"] == 4
    assert res["overall"]["rougeL"] == pytest.approx((100 + 0 + rl_t2 + 100) / 4)
    assert res["overall"]["rouge1"] == pytest.approx((100 + 0 + r1_t2 + 100) / 4)
    assert res["overall"]["exact_match"] == pytest.approx(25.0)  # only "yes"=="yes" ("running" != "run")
    assert res["per_task"]["t1"] == {"rougeL": 50.0, "rougeLsum": 50.0, "rouge1": 50.0, "exact_match": 50.0, "n": 2}
    assert res["per_category"]["A"]["n"] == 3
    assert res["per_category"]["A"]["rougeL"] == pytest.approx((100 + 0 + rl_t2) / 3)
    assert res["seen"]["overall"]["n"] == 3 and set(res["seen"]["per_task"]) == {"t1", "t2"}
    assert res["unseen"]["overall"] == {
        "rougeL": 100.0,
        "rougeLsum": 100.0,
        "rouge1": 100.0,
        "exact_match": 0.0,
        "n": 1,
    }
    assert set(res["unseen"]["per_category"]) == {"B"}


def test_aggregate_defaults_and_errors():
    res = aggregate([{"task": "t", "pred": "a", "refs": "a"}])
    assert "unseen" not in res and res["seen"]["overall"]["n"] == 1
    assert list(res["per_category"]) == ["Unknown"]
    with pytest.raises(KeyError, match="refs"):
        aggregate([{"task": "t", "pred": "a"}])
    with pytest.raises(ValueError):
        aggregate([])


def test_rouge_lsum_is_the_union_lcs_over_sentences():
    """Hand-computed: ref sentences "the cat sat" / "the dog ran", prediction in the other order.
    ROUGE-L (one LCS over the whole text) matches 3 of 6 tokens each way: F = 0.5. ROUGE-Lsum takes,
    for each reference sentence, the union of its LCS with every predicted sentence: all 3 tokens of
    each, so P = R = 6/6."""
    from orchmoe.evaluation.metrics import rouge_lsum, sentences

    pred, ref = "The dog ran. The cat sat.", "The cat sat. The dog ran."
    assert rouge_l(pred, ref) == pytest.approx(50.0)
    assert rouge_lsum(pred, ref) == pytest.approx(100.0)
    # ref "a b c. d e f" vs pred "a x c d y f": sentence 1 LCS "a c" (2), sentence 2 LCS "d f" (2);
    # R = 4/6, P = 4/6 (the prediction is one sentence of 6 tokens)
    assert rouge_lsum("aa xx cc dd yy ff", "aa bb cc. dd ee ff") == pytest.approx(100 * 4 / 6)
    assert rouge_lsum("just one answer", "just one answer") == rouge_l("just one answer", "just one answer") == 100.0
    assert sentences("First one!  Second?\nThird") == "First one!\nSecond?\nThird"
    assert set(score_example("a b", ["a b"])) == {"rougeL", "rougeLsum", "rouge1", "exact_match"}
