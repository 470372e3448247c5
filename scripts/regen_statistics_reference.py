"""Regenerate tests/fixtures/statistics_reference.json: Wilson 95% intervals and exact
McNemar p-values computed independently with statsmodels and scipy, on fixed inputs.
finellama_rl/eval/statistics.py (pure stdlib) must reproduce them (tests/test_statistics.py).

Not run in CI; scipy and statsmodels are not project dependencies. Run it in a
separate virtual environment:

    python3 -m venv /tmp/stats-venv && /tmp/stats-venv/bin/pip install scipy statsmodels
    /tmp/stats-venv/bin/python scripts/regen_statistics_reference.py

(Any environment with scipy and statsmodels works; the committed file was made in the
lm-eval venv of scripts/regen_lm_eval_fixture.py with statsmodels added.)
"""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "statistics_reference.json"

WILSON_INPUTS = [(0, 1), (1, 1), (0, 50), (50, 50), (32, 50), (25, 50), (1, 50), (49, 50), (7, 13), (660, 1319),
                 (1000, 1319), (1318, 1319), (3, 7), (123, 456), (0, 1319), (16, 16), (9, 16), (851, 1319)]
# (b, c): problems only A got right, only B got right
MCNEMAR_INPUTS = [(0, 0), (0, 1), (1, 0), (3, 3), (5, 0), (0, 6), (2, 9), (9, 2), (10, 20), (40, 61), (100, 130),
                  (17, 4), (1, 12), (50, 50), (0, 25), (120, 80), (7, 8), (300, 250)]


def main() -> None:
    from scipy.stats import binomtest
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint

    wilson = []
    for c, n in WILSON_INPUTS:
        lo, hi = proportion_confint(c, n, alpha=0.05, method="wilson")
        wilson.append({"correct": c, "n": n, "low": float(lo), "high": float(hi)})
    mc = []
    for b, c in MCNEMAR_INPUTS:
        table = [[11, b], [c, 13]]  # the concordant cells do not enter the exact test
        p_sm = float(mcnemar(table, exact=True).pvalue)
        p_scipy = float(binomtest(min(b, c), b + c, 0.5).pvalue) if b + c else 1.0
        mc.append({"b": b, "c": c, "p_statsmodels": p_sm, "p_scipy_binomtest": p_scipy})
    doc = {"what": "reference values for finellama_rl/eval/statistics.py",
           "command": "python scripts/regen_statistics_reference.py (with scipy and statsmodels installed)",
           "versions": {"scipy": version("scipy"), "statsmodels": version("statsmodels")},
           "wilson_95": wilson, "mcnemar_exact_two_sided": mc}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(wilson)} Wilson intervals, {len(mc)} McNemar p-values -> {OUT}")


if __name__ == "__main__":
    main()
