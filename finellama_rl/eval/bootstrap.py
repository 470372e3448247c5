"""Seeds aggregated: an arm's accuracy across its seeds with a 95% interval from a hierarchical
bootstrap over seeds and problems, its spread, and two arms compared on their common problems
with the probability that one beats the other (the "probability of improvement" of rliable,
Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice").

Why: one seed per arm is not a comparison. The demo's seed-to-seed spread is about +-7 points,
so a Wilson interval on one run (which counts only the problems' noise) is too narrow for the
arm. The bootstrap below counts both sources of noise: which seeds were run and which problems
were drawn.

Method (README "Sweep report"):
- An arm's runs give a (seeds x problems) 0/1 matrix on the problems every run of it evaluated.
- Point estimate: the mean over seeds of each seed's accuracy.
- Interval: REPLICATES bootstrap replicates; each draws the seeds with replacement (S of S) and
  the problems with replacement (n of n) and takes the mean of the drawn seeds' accuracies on
  the drawn problems; the 2.5th and 97.5th percentiles. In a comparison both arms share each
  replicate's problem draw (the comparison stays paired) and draw their seeds independently.
- Spread: min-max and sample standard deviation of the per-seed accuracies.
- P(B > A): the share of (run of A, run of B) pairs in which B's run is more accurate, ties
  counting half (the Mann-Whitney statistic rliable reports, on one task), with its bootstrap
  interval. The verdict: B (or A) better when the 95% interval of the difference excludes 0.
- Deterministic: numpy's default_rng(RNG_SEED); the same records give the same figures.

    est = estimate_arm(matrix)                  # matrix: (seeds, problems) of 0/1
    cmp = compare_arms(matrix_a, matrix_b)      # the same problems, in the same order
    cmp.delta, cmp.delta_ci, cmp.p_improvement, cmp.verdict

tests/test_bootstrap.py checks it against an exact enumeration of a small case. Used by the sweep
report (eval/arms.py). numpy only, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple

import numpy as np

REPLICATES = 2000
RNG_SEED = 0
CHUNK = 250  # replicates drawn at once: bounds memory at CHUNK x problems floats
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ArmEstimate:
    """One arm across its seeds (accuracies as fractions)."""

    seeds: int
    problems: int
    per_seed: Tuple[float, ...]
    mean: float
    ci: Tuple[float, float]

    @property
    def spread(self) -> Tuple[float, float]:
        return min(self.per_seed), max(self.per_seed)

    @property
    def std(self) -> float:
        """Sample standard deviation across seeds (nan with one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if self.seeds > 1 else math.nan


@dataclass(frozen=True)
class ArmComparison:
    """Arm B against arm A on their common problems (B - A)."""

    problems: int
    a: ArmEstimate
    b: ArmEstimate
    delta: float
    delta_ci: Tuple[float, float]
    p_improvement: float  # P(B > A): a run of B more accurate than a run of A, ties half
    p_improvement_ci: Tuple[float, float]

    @property
    def verdict(self) -> str:
        if self.delta_ci[0] > 0:
            return "B better"
        if self.delta_ci[1] < 0:
            return "A better"
        return "not significant"


def _matrix(x) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"need a (seeds, problems) matrix with at least one of each, got shape {m.shape}")
    return m


def _percentiles(values: np.ndarray) -> Tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def probability_of_improvement(acc_a: Sequence[float], acc_b: Sequence[float]) -> float:
    """P(B > A) over every (run of A, run of B) pair, ties counting half."""
    a, b = np.asarray(acc_a, dtype=float)[:, None], np.asarray(acc_b, dtype=float)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def _replicates(matrices: Sequence[np.ndarray], replicates: int) -> Iterator[Tuple[np.ndarray, ...]]:
    """Chunks of bootstrap replicates: for each matrix a (chunk, seeds) array of the drawn seeds'
    accuracies on the drawn problems (one problem draw per replicate, shared by all matrices)."""
    rng = np.random.default_rng(RNG_SEED)
    n = matrices[0].shape[1]
    done = 0
    while done < replicates:
        size = min(CHUNK, replicates - done)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size) / n  # (chunk, problems): the problem draw
        out = []
        for m in matrices:
            per_seed = weights @ m.T  # (chunk, seeds): every seed's accuracy on the drawn problems
            drawn = rng.integers(0, m.shape[0], size=(size, m.shape[0]))  # (chunk, seeds): the seed draw
            out.append(np.take_along_axis(per_seed, drawn, axis=1))
        yield tuple(out)
        done += size


def _estimate(m: np.ndarray, means: np.ndarray) -> ArmEstimate:
    per_seed = tuple(float(v) for v in m.mean(axis=1))
    return ArmEstimate(m.shape[0], m.shape[1], per_seed, float(np.mean(per_seed)), _percentiles(means))


def bootstrap_means(matrix, replicates: int = REPLICATES) -> np.ndarray:
    """The arm's bootstrap distribution of its mean accuracy (replicates,)."""
    return np.concatenate([drawn.mean(axis=1) for (drawn,) in _replicates([_matrix(matrix)], replicates)])


def estimate_arm(matrix, replicates: int = REPLICATES) -> ArmEstimate:
    """Mean accuracy across seeds with its hierarchical-bootstrap 95% interval."""
    m = _matrix(matrix)
    return _estimate(m, bootstrap_means(m, replicates))


def compare_arms(matrix_a, matrix_b, replicates: int = REPLICATES) -> ArmComparison:
    """B against A on the same problems (columns in the same order)."""
    a, b = _matrix(matrix_a), _matrix(matrix_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the arms must be on the same problems: {a.shape[1]} vs {b.shape[1]} columns")
    means_a, means_b, p_imp = [], [], []
    for drawn_a, drawn_b in _replicates([a, b], replicates):
        means_a.append(drawn_a.mean(axis=1))
        means_b.append(drawn_b.mean(axis=1))
        p_imp.append(np.mean((drawn_b[:, None, :] > drawn_a[:, :, None]) + 0.5 * (drawn_b[:, None, :] == drawn_a[:, :, None]),
                             axis=(1, 2)))
    ma, mb = np.concatenate(means_a), np.concatenate(means_b)
    est_a, est_b = _estimate(a, ma), _estimate(b, mb)
    return ArmComparison(a.shape[1], est_a, est_b, est_b.mean - est_a.mean, _percentiles(mb - ma),
                         probability_of_improvement(est_a.per_seed, est_b.per_seed), _percentiles(np.concatenate(p_imp)))
