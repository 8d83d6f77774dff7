"""The paired comparison behind the eval verdict, on small arrays worked out by hand: the exact
sign test, percentile bootstrap intervals, per-question means, the length-controlled view, and
the verdict's lines (two judges, their disagreement)."""

from __future__ import annotations

import math

import pytest

from camelid.eval.compare import compare, per_question_means, similar_length, verdict
from camelid.eval.stats import bootstrap_intervals, percentile, sign_test


def test_sign_test_by_hand():
    # n = 10, 9 wins: P(X <= 1) = (C(10,0) + C(10,1)) / 2^10 = 11/1024, two-sided 22/1024.
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == sign_test(9, 1)
    # 7 of 10: (1 + 10 + 45 + 120) / 1024 = 176/1024, two-sided 352/1024.
    assert sign_test(7, 3) == pytest.approx(352 / 1024)
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # 5 of 5: 2 · 2^-5
    assert sign_test(3, 3) == 1.0  # 2 · 42/64 > 1: capped
    assert sign_test(0, 0) == 1.0  # only ties: nothing to test


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.025) == pytest.approx(1.075)  # h = 0.075
    assert percentile([5.0], 0.9) == 5.0 and math.isnan(percentile([], 0.5))


def test_bootstrap_behaviour_by_hand():
    mean = lambda xs: (lambda idx: sum(xs[i] for i in idx) / len(idx))
    # Every question won: every resample has mean 1, the interval is the point.
    assert bootstrap_intervals(5, [mean([1.0] * 5)]) == [(1.0, 1.0)]
    # Outcomes (1, 1, 0): a resample's mean is k/3 with k ~ Binomial(3, 2/3): P = 1/27, 6/27, 12/27,
    # 8/27 for k = 0..3. Both tails hold more than 2.5%, so the 95% interval is (0, 1); the
    # resampled frequencies approach those probabilities.
    xs = [1.0, 1.0, 0.0]
    draws: list[float] = []

    def record(idx):
        draws.append(sum(xs[i] for i in idx) / 3)
        return draws[-1]

    assert bootstrap_intervals(3, [record], resamples=4000, seed=7) == [(0.0, 1.0)]
    for k, p in enumerate((1 / 27, 6 / 27, 12 / 27, 8 / 27)):
        assert sum(abs(d - k / 3) < 1e-9 for d in draws) / len(draws) == pytest.approx(p, abs=0.03)
    # Seeded: the same seed gives the same intervals; non-finite values are left out.
    stats = [mean([0.3, -1.0, 2.0, 0.1]), lambda idx: float("nan") if 0 in idx else 1.0]
    a = bootstrap_intervals(4, stats, resamples=500, seed=3)
    assert a == bootstrap_intervals(4, stats, resamples=500, seed=3) and a[1] == (1.0, 1.0)


def test_compare_by_hand():
    # 3 questions x 2 answers, answer-major (answer j of question i at i + 3j).
    a = [1.0, 0.0, 5.0, 3.0, 0.0, 1.0]  # per-question means 2, 0, 3
    b = [1.0, 1.0, 2.0, 1.0, -1.0, 2.0]  # per-question means 1, 0, 2
    assert per_question_means(a, 3) == [2.0, 0.0, 3.0] and per_question_means(b, 3) == [1.0, 0.0, 2.0]
    len_a, len_b = [10, 10, 10, 10, 30, 10], [11, 20, 10, 13, 10, 8]
    c = compare(a, b, len_a, len_b, questions=3, resamples=2000, seed=0)
    # Per question: win, tie, win -> (2 + 0.5) / 3; differences 1, 0, 1; sign test on 2 wins, 0 losses.
    assert (c.wins, c.ties, c.losses, c.questions) == (2, 1, 0, 3)
    assert c.rate == pytest.approx(2.5 / 3) and c.mean_diff == pytest.approx(2 / 3) and c.sign_p == 0.5
    # Resampled outcomes (1, 0.5, 1): every mean lies in [0.5, 1]; all-ties has P 1/27 > 2.5%, all-wins 8/27.
    assert (c.ci_low, c.ci_high) == (0.5, 1.0) and (c.diff_ci_low, c.diff_ci_high) == (0.0, 1.0)
    # Similar lengths (within 20%): 10/11 (tie 1 vs 1), 10/10 (win 5 vs 2), 10/8 (loss 1 vs 2);
    # 10/20, 10/13 and 30/10 are not. Rate (0.5 + 1 + 0) / 3.
    assert (c.similar_pairs, c.answer_pairs, c.similar_rate) == (3, 6, 0.5)
    assert 0.0 <= c.similar_ci_low <= 0.5 <= c.similar_ci_high <= 1.0
    assert similar_length(10, 8) and not similar_length(10, 13) and similar_length(0, 0)
    with pytest.raises(ValueError):
        compare(a, b[:4], len_a, len_b, questions=3)


def _cmp(wins: int, n: int, rate: float, low: float, high: float) -> dict:
    return {"wins": wins, "ties": 0, "losses": n - wins, "questions": n, "rate": rate, "ci_low": low,
            "ci_high": high, "sign_p": sign_test(wins, n - wins)}


def test_verdict_states_interval_and_questions_and_flags_disagreement():
    train = _cmp(31, 43, 31 / 43, 0.58, 0.84)
    v = verdict("ppo", "sft", train, _cmp(25, 43, 25 / 43, 0.44, 0.72))
    assert v["passed"] and not v["judges_disagree"]
    # 31 wins, 12 losses: p = 2 · Σ_{i<=12} C(43, i) / 2^43 = 0.00540.
    assert v["lines"][0] == ("PPO beats SFT on 31 of 43 questions: win rate 0.72 (paired 95% CI 0.58-0.84; "
                             "sign test p = 0.0054), training judge")
    assert v["lines"][1].startswith("PPO beats SFT on 25 of 43 questions") and v["lines"][1].endswith("second judge")
    hacked = verdict("ppo", "sft", train, _cmp(19, 43, 19 / 43, 0.30, 0.58))
    assert not hacked["passed"] and hacked["judges_disagree"]
    assert hacked["lines"][-1] == "the judges disagree: possible reward hacking"
    # A point estimate above 50% under the training judge is not enough: its interval must clear it.
    unsure = verdict("dpo", "sft", _cmp(24, 43, 24 / 43, 0.42, 0.70), _cmp(20, 43, 20 / 43, 0.33, 0.61))
    assert not unsure["passed"] and not unsure["judges_disagree"] and unsure["lines"][0].startswith("DPO beats SFT on 24")
    # Both lean towards DPO, only the second clears its bar: unsure, not a disagreement.
    leaning = verdict("dpo", "sft", _cmp(36, 64, 36 / 64, 0.44, 0.69), _cmp(39, 64, 39 / 64, 0.48, 0.72))
    assert not leaning["passed"] and not leaning["judges_disagree"] and len(leaning["lines"]) == 2
    opposed = verdict("dpo", "sft", _cmp(20, 43, 20 / 43, 0.33, 0.61), _cmp(25, 43, 25 / 43, 0.44, 0.72))
    assert opposed["judges_disagree"] and opposed["lines"][-1] == "the judges disagree: the second judge prefers DPO, the training judge does not"
    alone = verdict("ppo", "sft", train, None)
    assert not alone["passed"] and "no second judge" in alone["lines"][1]
