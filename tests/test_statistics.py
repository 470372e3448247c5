"""finellama_rl.eval.statistics against reference values computed independently with
statsmodels (proportion_confint method="wilson"; mcnemar exact=True) and scipy
(binomtest): tests/fixtures/statistics_reference.json, made by
scripts/regen_statistics_reference.py."""
from __future__ import annotations

import json
import random
from statistics import NormalDist
from pathlib import Path

import pytest

from finellama_rl.eval.statistics import compare_paired, format_interval, format_p, mcnemar_exact, wilson_interval

REF = json.loads((Path(__file__).resolve().parent / "fixtures" / "statistics_reference.json").read_text())


@pytest.mark.parametrize("row", REF["wilson_95"], ids=lambda r: f"{r['correct']}/{r['n']}")
def test_wilson_interval_equals_statsmodels(row):
    lo, hi = wilson_interval(row["correct"], row["n"])
    assert lo == pytest.approx(row["low"], abs=1e-12) and hi == pytest.approx(row["high"], abs=1e-12)


@pytest.mark.parametrize("row", REF["mcnemar_exact_two_sided"], ids=lambda r: f"b{r['b']}-c{r['c']}")
def test_mcnemar_exact_equals_statsmodels_and_scipy(row):
    p = mcnemar_exact(row["b"], row["c"])
    assert p == pytest.approx(row["p_statsmodels"], rel=1e-12, abs=1e-300)
    assert p == pytest.approx(row["p_scipy_binomtest"], rel=1e-9, abs=1e-300)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    lo, hi = wilson_interval(32, 50)
    assert (round(lo, 3), round(hi, 3)) == (0.501, 0.759)
    assert hi - lo > 0.25  # at n = 50 the interval is about +-13 points


def test_compare_paired_counts_and_verdicts():
    a = [True] * 30 + [False] * 20 + [True] * 5 + [False] * 45
    b = [True] * 30 + [True] * 20 + [False] * 5 + [False] * 45  # B fixes 20, breaks 5
    cmp = compare_paired(a, b)
    assert (cmp.n, cmp.both, cmp.only_a, cmp.only_b, cmp.neither) == (100, 30, 5, 20, 45)
    assert (cmp.accuracy_a, cmp.accuracy_b) == (0.35, 0.5) and cmp.delta == pytest.approx(0.15)
    assert cmp.p_value == pytest.approx(mcnemar_exact(5, 20)) and cmp.p_value < 0.05
    assert cmp.significant and cmp.verdict == "B better"
    same = compare_paired([True, False, True], [False, True, True])
    assert same.p_value == 1.0 and same.verdict == "not significant"
    assert compare_paired([], []).verdict == "no common problems"
    with pytest.raises(ValueError):
        compare_paired([True], [True, False])


def test_mcnemar_p_is_symmetric_and_a_probability():
    rng = random.Random(0)
    for _ in range(200):
        b, c = rng.randint(0, 60), rng.randint(0, 60)
        p = mcnemar_exact(b, c)
        assert 0 < p <= 1 and p == mcnemar_exact(c, b)


def test_formatting():
    assert format_interval((0.5014, 0.7586)) == "[50.1, 75.9]" and format_interval(None) == "-"
    assert format_p(0.0004) == "<0.001" and format_p(0.0412) == "0.041" and format_p(None) == "-"


def test_mann_kendall_by_hand():
    """S and Var(S) by hand: n = 6 strictly rising: S = 15, Var = 6*5*17/18 = 85/3, z = (15-1)/sqrt(85/3);
    one tie pair among 4 values [1, 2, 2, 3]: S = 5, Var = (4*3*13 - 2*1*9)/18 = 23/3."""
    import math

    from finellama_rl.eval.statistics import mann_kendall

    up = mann_kendall([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert (up.n, up.s) == (6, 15) and up.z == pytest.approx(14 / math.sqrt(85 / 3))
    assert up.p_increasing == pytest.approx(1 - NormalDist().cdf(14 / math.sqrt(85 / 3)))
    tied = mann_kendall([1, 2, 2, 3])
    assert tied.s == 5 and tied.z == pytest.approx(4 / math.sqrt(23 / 3))
    down = mann_kendall([6, 5, 4, 3, 2, 1])
    assert down.s == -15 and down.p_increasing > 0.99
    assert mann_kendall([2, 2, 2]).p_increasing == 1.0  # no variance: no trend
