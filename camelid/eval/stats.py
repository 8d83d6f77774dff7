"""Small pure statistics for evaluation: win rates with a Wilson interval, the exact sign test,
percentile bootstrap intervals, answer repetition.

Standard library only (tests and the report import it without torch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209-212):

        centre = (p + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²),

    p = successes / n. Chosen over the normal ("Wald") interval because it stays inside [0, 1]
    and keeps close to its nominal coverage for small n and p near 0 or 1, the situation of a
    few dozen held-out questions (Brown, Cai & DasGupta 2001, Statistical Science 16:101-133).
    A tie counted as half a success (a fractional `successes`) is allowed.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class WinRate:
    """How often answers of model A got a higher reward than model B's answer to the same question."""

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    """(wins + ties/2) / n."""
    ci_low: float
    ci_high: float
    """95% Wilson interval of `rate`."""

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "ci": "Wilson score interval, 95%"}


def win_rate(a: Sequence[float], b: Sequence[float], tol: float = 0.0) -> WinRate:
    """Paired comparison of per-question rewards `a[i]` vs `b[i]`; |a - b| <= tol is a tie (half)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} vs {len(b)}")
    wins = sum(1 for x, y in zip(a, b) if x - y > tol)
    losses = sum(1 for x, y in zip(a, b) if y - x > tol)
    ties = len(a) - wins - losses
    n = len(a)
    rate = (wins + ties / 2) / n if n else float("nan")
    low, high = wilson_interval(wins + ties / 2, n)
    return WinRate(wins, ties, losses, n, rate, low, high)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (nan, nan for an empty list)."""
    if not xs:
        return (float("nan"), float("nan"))
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def repeated_ngram_share(tokens: Sequence[object], n: int = 4) -> float:
    """Share of an answer's n-grams that repeat an earlier n-gram of the same answer (0 = none).

    A cheap degeneration signal (Welleck et al. 2019, "Neural Text Generation with Unlikelihood
    Training", seq-rep-n): reward-hacked policies loop on phrases, fluent answers score near 0.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (Conover 1999, §3.4): the p-value of `wins` against `losses`
    under no preference, ties left out: 2 · P(X ≤ min(wins, losses)), X ~ Binomial(wins + losses,
    1/2), capped at 1 (1 when there is nothing to test)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of sorted values, interpolated linearly between order statistics
    at position q · (n − 1) (numpy's default, "type 7")."""
    if not sorted_values:
        return float("nan")
    h = q * (len(sorted_values) - 1)
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def bootstrap_intervals(n: int, statistics: Sequence[Callable[[list[int]], float]], resamples: int = 2000,
                        seed: int = 0, level: float = 0.95) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13) of several statistics of
    the same `n` items, resampled together: each resample draws n item indices with replacement
    (`random.Random(seed)`, so a seed gives the same intervals), each statistic maps the drawn
    indices to a value (a non-finite one is left out: e.g. a ratio over no pairs), and the
    interval is the (1 − level)/2 and (1 + level)/2 quantiles of its values."""
    import random

    rng = random.Random(seed)
    values: list[list[float]] = [[] for _ in statistics]
    for _ in range(resamples if n else 0):
        idx = [int(rng.random() * n) for _ in range(n)]
        for out, stat in zip(values, statistics):
            v = stat(idx)
            if math.isfinite(v):
                out.append(v)
    tail = (1 - level) / 2
    return [(percentile(sorted(v), tail), percentile(sorted(v), 1 - tail)) for v in values]
