"""Paired comparison of two models on held-out questions, and the verdict the report states.

Each model answers every question k times (its own seeds). A judge (reward model) scores each
answer; a question's score for a model is the mean over its k answers, so the unit compared is
the question, not the answer: answers to one question are not independent draws.

- Win rate: share of questions where A's mean reward beats B's (a tie counts half), with a
  paired percentile bootstrap interval over questions, and the mean reward difference with its
  own interval from the same resamples (camelid.eval.stats.bootstrap_intervals).
- Sign test: exact two-sided p-value of the questions A wins against those it loses.
- Length-controlled view: among answer pairs (A's answer j vs B's answer j to one question) whose
  token lengths are within `tolerance` of each other, the share A wins: a judge that prefers
  longer answers cannot make a policy look better here by length alone. Its interval resamples
  questions too.
- Verdict (A vs SFT): the lower end of the paired 95% interval above 50% under the training judge
  (the reward model PPO optimised), and the point estimate above 50% under a second judge trained
  on pairs the first never saw. When one judge prefers A and the other does not, the verdict says so.

Standard library only (the report imports it without torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from camelid.eval.stats import bootstrap_intervals, sign_test

BAR = 0.5
"""The win rate a verdict must clear: the training judge's interval lower end, the second judge's point."""
LENGTH_TOLERANCE = 0.2
"""Answers are of similar length when |len_a − len_b| ≤ 0.2 · max(len_a, len_b) tokens."""
NAMES = {"base": "base", "sft": "SFT", "ppo": "PPO", "dpo": "DPO"}


def per_question_means(values: Sequence[float], questions: int) -> list[float]:
    """Mean per question of answer-major values: answer j to question i at index i + j · questions."""
    k = len(values) // questions
    return [sum(values[i + j * questions] for j in range(k)) / k for i in range(questions)]


def _outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.0 if a < b else 0.5


def similar_length(la: int, lb: int, tolerance: float = LENGTH_TOLERANCE) -> bool:
    return abs(la - lb) <= tolerance * max(la, lb)


@dataclass(frozen=True)
class Comparison:
    """A vs B under one judge, question by question."""

    questions: int
    wins: int
    ties: int
    losses: int
    rate: float
    """(wins + ties/2) / questions, on per-question mean rewards."""
    ci_low: float
    ci_high: float
    """Paired percentile bootstrap 95% interval of `rate`, resampling questions."""
    mean_diff: float
    """Mean over questions of A's mean reward minus B's."""
    diff_ci_low: float
    diff_ci_high: float
    sign_p: float
    """Exact two-sided sign test p-value (ties left out)."""
    similar_pairs: int
    """Answer pairs of similar length (the length-controlled view's sample)."""
    answer_pairs: int
    similar_rate: float
    """Share of the similar-length answer pairs A wins (ties half); nan when there are none."""
    similar_ci_low: float
    similar_ci_high: float
    resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci": "paired percentile bootstrap over questions, 95%",
                "similar": f"answer pairs with token lengths within {LENGTH_TOLERANCE:.0%} of each other"}


def compare(a: Sequence[float], b: Sequence[float], len_a: Sequence[int], len_b: Sequence[int], questions: int,
            resamples: int = 2000, seed: int = 0, tolerance: float = LENGTH_TOLERANCE) -> Comparison:
    """A vs B from answer-major rewards and token lengths (see `per_question_means`)."""
    if not len(a) == len(b) == len(len_a) == len(len_b) or questions < 1 or len(a) % questions:
        raise ValueError("need rewards and lengths of both models for every answer to every question")
    mean_a, mean_b = per_question_means(a, questions), per_question_means(b, questions)
    outcome = [_outcome(x, y) for x, y in zip(mean_a, mean_b)]
    diff = [x - y for x, y in zip(mean_a, mean_b)]
    # Per question: the similar-length answer pairs and A's wins among them.
    sim_n, sim_w = [0] * questions, [0.0] * questions
    for n, (ra, rb, la, lb) in enumerate(zip(a, b, len_a, len_b)):
        if similar_length(la, lb, tolerance):
            sim_n[n % questions] += 1
            sim_w[n % questions] += _outcome(ra, rb)
    ratio = lambda idx: sum(sim_w[i] for i in idx) / sum(sim_n[i] for i in idx) if any(sim_n[i] for i in idx) else float("nan")
    (lo, hi), (dlo, dhi), (slo, shi) = bootstrap_intervals(
        questions, [lambda idx: sum(outcome[i] for i in idx) / len(idx), lambda idx: sum(diff[i] for i in idx) / len(idx),
                    ratio], resamples, seed)
    wins, losses = outcome.count(1.0), outcome.count(0.0)
    return Comparison(questions, wins, questions - wins - losses, losses, sum(outcome) / questions, lo, hi,
                      sum(diff) / questions, dlo, dhi, sign_test(wins, losses), sum(sim_n), len(a),
                      ratio(range(questions)), slo, shi, resamples, seed)


def describe(a: str, b: str, c: dict[str, Any], judge: str) -> str:
    """One line: '<A> beats <B> on w of n questions: win rate r (paired 95% CI lo-hi; sign test p), <judge>'."""
    ties = f" ({c['ties']} ties)" if c["ties"] else ""
    return (f"{NAMES.get(a, a)} beats {NAMES.get(b, b)} on {c['wins']} of {c['questions']} questions{ties}: "
            f"win rate {c['rate']:.2f} (paired 95% CI {c['ci_low']:.2f}-{c['ci_high']:.2f}; "
            f"sign test p = {c['sign_p']:.2g}), {judge}")


def verdict(a: str, b: str, training: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    """The bar for A over B (see the module docstring) with its one-line statements; `training` and
    `second` are Comparison.to_dict() under each judge (second None: no second judge)."""
    lines = [describe(a, b, training, "training judge")]
    train_ok = training["ci_low"] > BAR
    second_ok = second is not None and second["rate"] > BAR
    if second is None:
        lines.append("no second judge: the bar needs one that PPO never saw")
    else:
        lines.append(describe(a, b, second, "second judge"))
    # Disagreement: one judge prefers A and the other does not. The training judge's preference
    # counts when its interval clears the bar (a point estimate above it is not one it
    # can defend), so does the second judge's above it; a training judge that leans the same way as
    # the second, without clearing the bar, is unsure, not in disagreement.
    hacked = second is not None and train_ok and not second_ok
    unseen = second is not None and second_ok and training["rate"] <= BAR
    disagree = hacked or unseen
    if hacked:
        lines.append("the judges disagree: possible reward hacking")
    elif unseen:
        lines.append(f"the judges disagree: the second judge prefers {NAMES.get(a, a)}, the training judge does not")
    return {"passed": train_ok and second_ok, "training_passed": train_ok, "second_passed": second_ok,
            "judges_disagree": disagree, "lines": lines,
            "bar": f"lower end of the paired 95% CI above {BAR:.2f} under the training judge, "
                   f"point estimate above {BAR:.2f} under the second judge"}
