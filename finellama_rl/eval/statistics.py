"""Error bars and paired tests for accuracies on a test set.

Why: at n = 50 a 95% interval on an accuracy near 60% is about +-13 points, so
most differences between two evaluations are noise. Every accuracy we write
carries a Wilson score interval (good coverage near 0 and 1 and at small n,
unlike the normal approximation), and two evaluations of the same problems are
compared with the exact McNemar test, which uses only the problems on which they
disagree (the pairing removes the between-problem variance that an unpaired test
would count as noise).

    lo, hi = wilson_interval(correct=32, n=50)          # (0.501, 0.759)
    cmp = compare_paired(base_correct, final_correct)   # cmp.p_value, cmp.verdict
    trend = mann_kendall(rewards)                       # trend.p_increasing: a rising series?

tests/test_statistics.py checks both against statsmodels and scipy
(reference values in tests/fixtures/statistics_reference.json, made by
scripts/regen_statistics_reference.py). Pure stdlib.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Dict, Optional, Sequence, Tuple

CONFIDENCE = 0.95
ALPHA = 0.05


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> Optional[Tuple[float, float]]:
    """Wilson score interval for `correct` successes out of `n` (None when n == 0)."""
    if n <= 0:
        return None
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right) and c
    (only B right): 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


@dataclass(frozen=True)
class PairedComparison:
    """A and B on the same n problems (B - A)."""

    n: int
    both: int
    only_a: int
    only_b: int
    neither: int
    accuracy_a: float
    accuracy_b: float
    delta: float
    p_value: float
    test: str = "exact McNemar, two-sided"

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "no common problems"
        if not self.significant:
            return "not significant"
        return "B better" if self.delta > 0 else "A better"

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict, "alpha": ALPHA}


def compare_paired(a: Sequence[bool], b: Sequence[bool]) -> PairedComparison:
    """Exact McNemar comparison of two per-problem correctness vectors in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length: {len(a)} vs {len(b)}")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    acc_a = (both + only_a) / n if n else 0.0
    acc_b = (both + only_b) / n if n else 0.0
    return PairedComparison(n, both, only_a, only_b, n - both - only_a - only_b, acc_a, acc_b, acc_b - acc_a,
                            mcnemar_exact(only_a, only_b))


def format_interval(ci: Optional[Sequence[float]]) -> str:
    return "-" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_p(p: Optional[float]) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


@dataclass(frozen=True)
class Trend:
    """Mann-Kendall trend test of a series in time order."""

    n: int
    s: int  # sum over i < j of sign(x_j - x_i)
    z: float
    p_increasing: float  # one-sided p-value for an increasing trend (normal approximation)


def mann_kendall(values: Sequence[float]) -> Trend:
    """Mann-Kendall test: S = sum_{i<j} sign(x_j - x_i), Var(S) = [n(n-1)(2n+5) - sum over tied
    groups t(t-1)(2t+5)] / 18, z = (S - sign(S)) / sqrt(Var) (continuity correction), p = P(Z >= z).
    Rank-based, so one outlier step cannot make a trend; the normal approximation wants n >= 8 or so.
    Used by the report's reward-hacking flag (eval/training_signals.py)."""
    x = list(values)
    n = len(x)
    s = sum((x[j] > x[i]) - (x[j] < x[i]) for i in range(n) for j in range(i + 1, n))
    ties: Dict[float, int] = {}
    for v in x:
        ties[v] = ties.get(v, 0) + 1
    var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in ties.values())) / 18
    if var <= 0:
        return Trend(n, s, 0.0, 1.0)
    z = (s - (s > 0) + (s < 0)) / math.sqrt(var)
    return Trend(n, s, z, 1 - NormalDist().cdf(z))
