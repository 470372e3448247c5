"""Evaluations side by side: accuracy with its 95% interval, and paired tests of two
evaluations on the same problems (a run against its baseline, runs against each
other). Only evaluations under the same protocol and primary scorer are compared;
the pairing uses each record's index in the test split and its question text, so
two evaluations of different problem sets are compared on their common problems.

Used by the sweep report (finellama_rl/report.py). Pure: no torch.

    a, b = EvalView.of(base_doc), EvalView.of(final_doc)
    cmp = paired(a, b)            # None when they cannot be paired (protocols differ, no records)
    cmp.p_value, cmp.verdict      # exact McNemar, "not significant" | "B better" | "A better"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from finellama_rl.eval import schema
from finellama_rl.eval.statistics import PairedComparison, compare_paired


@dataclass
class EvalView:
    """What the report needs of one eval document (any schema version)."""

    protocol: str
    scorer: str
    accuracy: float
    n: int
    ci: Optional[Tuple[float, float]]
    step: Optional[int] = None
    strict: Optional[float] = None
    lenient: Optional[float] = None
    per_problem: Dict[Tuple[Any, str], bool] = field(default_factory=dict)
    split: str = "test"
    """Which split was evaluated: "validation" or "test" (the eval file's `split`; missing = test)."""

    @property
    def key(self) -> Tuple[str, str]:
        return self.protocol, self.scorer

    @classmethod
    def of(cls, doc: Optional[Dict[str, Any]]) -> Optional["EvalView"]:
        """None when the document has no usable primary accuracy in [0, 1]."""
        if not isinstance(doc, dict) or not isinstance(doc.get("accuracy"), dict):
            return None
        try:
            scorer = schema.primary_scorer(doc)
            acc = schema.accuracy(doc, scorer)
            n = schema.total(doc)
        except (TypeError, ValueError):
            return None
        if acc is None or not 0.0 <= acc <= 1.0 or n < 0:
            return None
        step = doc.get("step") if isinstance(doc.get("step"), int) and not isinstance(doc.get("step"), bool) else None
        return cls(schema.protocol_name(doc), scorer, acc, n, _safe_interval(doc, scorer), step,
                   _fraction(doc, "strict"), _fraction(doc, "lenient"), schema.correctness(doc, scorer), split_of(doc))


def split_of(doc: Dict[str, Any]) -> str:
    """The split an eval document measured: its `split` ("validation" | "test", or {"name": ...}); files
    written before the validation split existed measured the test split (eval/schema.py split_name)."""
    return schema.split_name(doc)


def _fraction(doc: Dict[str, Any], scorer: str) -> Optional[float]:
    try:
        value = schema.accuracy(doc, scorer)
    except (TypeError, ValueError):
        return None
    return value if value is not None and 0.0 <= value <= 1.0 else None


def _safe_interval(doc: Dict[str, Any], scorer: str) -> Optional[Tuple[float, float]]:
    try:
        return schema.interval(doc, scorer)
    except (TypeError, ValueError, IndexError):
        return None


def paired(a: Optional[EvalView], b: Optional[EvalView]) -> Optional[PairedComparison]:
    """Exact McNemar of B against A on their common problems; None when they are not comparable
    (missing, different protocol, scorer or split, or no per-problem records in common)."""
    if a is None or b is None or a.key != b.key or a.split != b.split:
        return None
    common = [k for k in a.per_problem if k in b.per_problem]
    if not common:
        return None
    return compare_paired([a.per_problem[k] for k in common], [b.per_problem[k] for k in common])


def why_not_paired(a: Optional[EvalView], b: Optional[EvalView]) -> str:
    if a is None or b is None:
        return "-"
    if a.split != b.split:
        return "splits differ"
    if a.key != b.key:
        return "protocols differ"
    return "no per-problem records"
