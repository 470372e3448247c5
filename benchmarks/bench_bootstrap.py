"""Speed of the sweep report's seed aggregation (finellama_rl/eval/bootstrap.py): 2,000 hierarchical
bootstrap replicates for one arm and for a comparison of two arms of 3 seeds on the whole GSM8K
test split (1,319 problems), and at 5 seeds x 5,000 problems. Target: under 2 s per comparison.

    .venv/bin/python benchmarks/bench_bootstrap.py
"""
from __future__ import annotations

import time

import numpy as np

from finellama_rl.eval.bootstrap import compare_arms, estimate_arm


def main() -> None:
    rng = np.random.default_rng(0)
    for seeds, problems in ((3, 1319), (5, 5000)):
        a, b = rng.random((seeds, problems)) < 0.6, rng.random((seeds, problems)) < 0.62
        for name, fn in (("estimate_arm", lambda: estimate_arm(a)), ("compare_arms", lambda: compare_arms(a, b))):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            print(f"{name:13s} {seeds} seeds x {problems:5d} problems: median {sorted(times)[1]:.3f} s (of 3)")


if __name__ == "__main__":
    main()
