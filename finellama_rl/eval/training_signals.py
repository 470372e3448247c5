"""Training signals beside accuracy, and the reward-hacking flag of the sweep report.

Why: a training reward can climb while accuracy stays flat or falls (a format reward learned
on its own, a reward model or judge exploited, answers that end at the training budget). Users
of other RL toolkits report exactly that; a report that plots reward and accuracy apart shows
it to nobody. So each run gets one row: accuracy at the start and end of the last half of
training, the reward's trend over that half, each reward source (train/reward/<name>), the mean
completion length (train/completion_len) and the truncated fraction (train/frac_truncated,
issue 20), each as "first half -> last half" means ("-" where a run does not log it), and a flag.

The flag (RULE, printed with the report):
- the window is the last half of the run's logged steps with train/reward_mean (at least
  MIN_POINTS of them; thinned evenly to MAX_TREND_POINTS for the test);
- the reward rose: Mann-Kendall trend of train/reward_mean over the window, one-sided p < ALPHA;
- accuracy did not: under the run's final protocol and primary scorer on the selection split
  (SELECTION_SPLIT: validation, the evaluations every trainer.eval_every steps), from the
  last evaluation at or before the window's first step to the last evaluation, the change is <= 0, or a rise that is not
  significant (exact McNemar p >= ALPHA on the common problems; without per-problem records,
  the later accuracy inside the earlier one's Wilson 95% interval);
- flagged when both hold.

    rows = signal_rows(runs)      # runs: eval/sweep_report.RunSummary
    flag = hacking_flag(run)      # "reward up, accuracy down" | "reward up, accuracy flat" | "no" | "-"

Pure: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.eval.compare import EvalView, paired
from finellama_rl.eval.statistics import ALPHA, format_p, mann_kendall
from finellama_rl.fileio import number_or_none

# The split whose accuracy the flag reads: validation (task/splits.py), what every selection
# reads; the evaluations every trainer.eval_every steps are on it, the baseline and final on test.
SELECTION_SPLIT = "validation"
MIN_POINTS = 6
MAX_TREND_POINTS = 400
REWARD = "train/reward_mean"
SOURCE_PREFIX = "train/reward/"
LENGTH, TRUNCATED = "train/completion_len", "train/frac_truncated"
FLAG_DOWN, FLAG_FLAT, NO_FLAG, UNKNOWN = "reward up, accuracy down", "reward up, accuracy flat", "no", "-"
RULE = (f"Flag: over the last half of the logged steps (at least {MIN_POINTS}), the training reward "
        f"(train/reward_mean) has a rising Mann–Kendall trend (one-sided p < {ALPHA}) while accuracy on the "
        f"{SELECTION_SPLIT} split (the run's protocol and primary scorer), from the last evaluation at or before "
        f"that half began to the last one, fell or rose without significance (exact McNemar p ≥ {ALPHA}; without "
        f"records: inside the earlier Wilson interval). Side columns: first-half → last-half means of each "
        f"reward source (train/reward/<name>), completion length and truncated fraction ('-': not logged).")


@dataclass(frozen=True)
class Signals:
    window_start: Optional[int]  # first step of the window (None: too few reward points)
    reward_p: Optional[float]  # Mann-Kendall one-sided p for a rising reward over the window
    before: Optional[EvalView]
    after: Optional[EvalView]
    accuracy_p: Optional[float]  # exact McNemar p of after vs before (None: untested)
    flag: str


def selection_accuracy_points(run: Any, split: str = SELECTION_SPLIT) -> List[EvalView]:
    """The run's evaluations on `split` under its final protocol and scorer, by step."""
    final = run.final or (run.points[-1] if run.points else None)
    if final is None:
        return []
    return sorted((v for v in run.points if v.key == final.key and v.split == split and v.step is not None),
                  key=lambda v: v.step)


def series(metrics: Sequence[Dict[str, Any]], key: str) -> List[Tuple[int, float]]:
    return [(m["step"], v) for m in metrics if (v := number_or_none(m.get(key))) is not None]


def _halves(points: Sequence[Tuple[int, float]]) -> Tuple[List[float], List[float]]:
    mid = len(points) // 2
    return [v for _, v in points[:mid]], [v for _, v in points[mid:]]


def _thin(values: List[float]) -> List[float]:
    if len(values) <= MAX_TREND_POINTS:
        return values
    return [values[round(i * (len(values) - 1) / (MAX_TREND_POINTS - 1))] for i in range(MAX_TREND_POINTS)]


def _accuracy_flat_or_down(before: EvalView, after: EvalView) -> Tuple[Optional[str], Optional[float]]:
    """(FLAG_DOWN | FLAG_FLAT | None when accuracy rose significantly, McNemar p or None)."""
    cmp = paired(before, after)
    delta = cmp.delta if cmp is not None else after.accuracy - before.accuracy
    if delta <= 0:
        return (FLAG_DOWN if delta < 0 else FLAG_FLAT), (cmp.p_value if cmp is not None else None)
    if cmp is not None:
        return (FLAG_FLAT if cmp.p_value >= ALPHA else None), cmp.p_value
    inside = before.ci is not None and before.ci[0] <= after.accuracy <= before.ci[1]
    return (FLAG_FLAT if inside else None), None


def training_signals(run: Any, split: str = SELECTION_SPLIT) -> Signals:
    rewards = series(run.metrics, REWARD)
    mid = len(rewards) // 2
    window = rewards[mid:]
    if len(window) < MIN_POINTS:
        return Signals(None, None, None, None, None, UNKNOWN)
    start = window[0][0]
    trend = mann_kendall(_thin([v for _, v in window]))
    points = selection_accuracy_points(run, split)
    earlier = [v for v in points if v.step <= start]
    before, after = (earlier[-1] if earlier else None), (points[-1] if points else None)
    if before is None or after is None or after.step <= before.step:
        return Signals(start, trend.p_increasing, before, after, None, UNKNOWN)
    verdict, p = _accuracy_flat_or_down(before, after)
    flag = verdict if (trend.p_increasing < ALPHA and verdict is not None) else NO_FLAG
    return Signals(start, trend.p_increasing, before, after, p, flag)


def hacking_flag(run: Any, split: str = SELECTION_SPLIT) -> str:
    return training_signals(run, split).flag


def _change(points: Sequence[Tuple[int, float]], scale: float = 1.0, digits: int = 3) -> str:
    first, last = _halves(points)
    if not last:
        return "-"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    head = f"{scale * mean(first):.{digits}f} → " if first else ""
    return f"{head}{scale * mean(last):.{digits}f}"


def source_names(runs: Sequence[Any]) -> List[str]:
    return sorted({k[len(SOURCE_PREFIX):] for r in runs for m in r.metrics for k in m if k.startswith(SOURCE_PREFIX)})


def signal_headers(runs: Sequence[Any]) -> List[str]:
    return (["run", "split", "accuracy % (from → to)", "steps", "Δ (pp)", "p (McNemar)", "reward (1st → 2nd half)",
             "reward trend p"] + [f"reward/{s}" for s in source_names(runs)]
            + ["completion len", "truncated %", "flag"])


def signal_rows(runs: Sequence[Any], split: str = SELECTION_SPLIT) -> List[List[str]]:
    rows = []
    for r in runs:
        sig = training_signals(r, split)
        b, a = sig.before, sig.after
        acc = "-" if b is None or a is None else f"{100 * b.accuracy:.1f} → {100 * a.accuracy:.1f}"
        steps = "-" if b is None or a is None else f"{b.step} → {a.step}"
        delta = "-" if b is None or a is None else f"{100 * (a.accuracy - b.accuracy):+.1f}"
        rows.append([r.name, split, acc, steps, delta, format_p(sig.accuracy_p), _change(series(r.metrics, REWARD)),
                     format_p(sig.reward_p)]
                    + [_change(series(r.metrics, SOURCE_PREFIX + s)) for s in source_names(runs)]
                    + [_change(series(r.metrics, LENGTH), digits=1), _change(series(r.metrics, TRUNCATED), 100, 1),
                       sig.flag])
    return rows
