"""finellama_rl.eval.bootstrap: the hierarchical bootstrap over seeds and problems against an
exact enumeration of a small case, the probability of improvement and the spread by hand,
and determinism on a whole-GSM8K-sized case (its speed: benchmarks/bench_bootstrap.py)."""
from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from finellama_rl.eval import bootstrap
from finellama_rl.eval.bootstrap import compare_arms, estimate_arm, probability_of_improvement

# Two seeds on three problems: seed 0 solves problems 0 and 2, seed 1 solves all three.
SMALL = [[1, 0, 1], [1, 1, 1]]


def exact_distribution(matrix):
    """Every equally likely (seed draw, problem draw) of the bootstrap, enumerated: {mean: probability}."""
    s, n = len(matrix), len(matrix[0])
    dist: Counter = Counter()
    for seeds in itertools.product(range(s), repeat=s):
        for problems in itertools.product(range(n), repeat=n):
            dist[Fraction(sum(matrix[i][j] for i in seeds for j in problems), s * n)] += 1
    total = sum(dist.values())
    return {value: Fraction(count, total) for value, count in dist.items()}


def test_bootstrap_distribution_matches_the_exact_enumeration():
    exact = exact_distribution(SMALL)  # 4 seed draws x 27 problem draws
    assert sum(exact.values()) == 1 and exact[Fraction(1)] == Fraction(1, 4) * 1 + Fraction(2, 4) * Fraction(8, 27) + Fraction(1, 4) * Fraction(8, 27)
    draws = bootstrap.bootstrap_means(SMALL, replicates=40000)
    for value, probability in exact.items():
        assert np.mean(np.isclose(draws, float(value))) == pytest.approx(float(probability), abs=0.01), value
    expected_mean = sum(float(v * p) for v, p in exact.items())
    assert draws.mean() == pytest.approx(expected_mean, abs=0.005)
    # the 95% interval: the exact 2.5% and 97.5% quantiles of that distribution
    cumulative, low, high = 0.0, None, None
    for value in sorted(exact):
        cumulative += float(exact[value])
        if low is None and cumulative > 0.025:
            low = float(value)
        if high is None and cumulative >= 0.975:
            high = float(value)
    est = estimate_arm(SMALL, replicates=40000)
    assert (est.mean, est.ci) == (pytest.approx(5 / 6), (pytest.approx(low), pytest.approx(high)))
    assert (low, high) == (pytest.approx(1 / 3), 1.0)  # by hand: seed 0 on problem 1 drawn thrice is 0, P = 1/4 x 1/27


def test_probability_of_improvement_spread_and_delta_by_hand():
    assert probability_of_improvement([0.2, 0.4, 0.6], [0.5, 0.5, 0.7]) == pytest.approx(7 / 9)  # 2 + 2 + 3 of 9 pairs
    assert probability_of_improvement([0.5], [0.5]) == 0.5 and probability_of_improvement([0.1, 0.2], [0.3]) == 1.0
    a = np.zeros((3, 10))
    b = np.zeros((3, 10))
    for seed, (ca, cb) in enumerate([(2, 5), (4, 5), (6, 7)]):  # per-seed accuracies 0.2/0.4/0.6 and 0.5/0.5/0.7
        a[seed, :ca], b[seed, :cb] = 1, 1
    cmp = compare_arms(a, b, replicates=2000)
    assert (cmp.a.mean, cmp.b.mean, cmp.delta) == (pytest.approx(0.4), pytest.approx(17 / 30), pytest.approx(1 / 6))
    assert cmp.p_improvement == pytest.approx(7 / 9) and cmp.a.spread == (0.2, 0.6)
    assert cmp.a.std == pytest.approx(0.2) and cmp.delta_ci[0] <= cmp.delta <= cmp.delta_ci[1]
    assert 0 <= cmp.p_improvement_ci[0] <= cmp.p_improvement <= cmp.p_improvement_ci[1] <= 1
    assert cmp.verdict in ("B better", "not significant")
    same = compare_arms(a, a)
    assert same.delta == 0 and same.p_improvement == 0.5 and same.verdict == "not significant"
    assert compare_arms(np.zeros((2, 50)), np.ones((2, 50))).verdict == "B better"
    assert compare_arms(np.ones((2, 50)), np.zeros((2, 50))).verdict == "A better"


def test_one_seed_is_a_bootstrap_over_problems_only_and_degenerate_arms_have_no_width():
    assert estimate_arm([[1, 1, 1, 1]]).ci == (1.0, 1.0) and np.isnan(estimate_arm([[1, 0]]).std)
    one = estimate_arm([[1, 0] * 50])
    assert one.ci[0] < 0.5 < one.ci[1] and one.ci[1] - one.ci[0] == pytest.approx(0.2, abs=0.04)  # about +-1.96 x 0.05
    with pytest.raises(ValueError):
        compare_arms(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError):
        estimate_arm([])


def test_the_bootstrap_is_deterministic_on_a_whole_gsm8k_sweep():
    rng = np.random.default_rng(7)
    a = rng.random((3, 1319)) < 0.6
    b = rng.random((3, 1319)) < 0.62
    first = compare_arms(a, b)
    assert compare_arms(a, b) == first and estimate_arm(a) == estimate_arm(a)
    assert first.a.ci != estimate_arm(rng.random((3, 1319)) < 0.6).ci  # other records, other figures
