"""Reading eval documents of every schema version (eval_baseline.json,
eval_results.json, evals/*.json): which protocol and scorer, accuracy with its
95% interval, and per-problem correctness for paired tests.

Schema 2 (this release) names its protocol and primary scorer and records every
scorer; schema 1 (before) knew only the finellama `####` protocol, with strict as
its headline and lenient as a variant. Readers (index, report, status) go through
these functions, so both stay readable. Pure: no torch, cheap to import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from finellama_rl.eval.statistics import wilson_interval

EVAL_SCHEMA_VERSION = 2
V1_PROTOCOL = "finellama"


def schema_version(doc: Dict[str, Any]) -> int:
    try:
        return int(doc.get("schema_version") or 1)
    except (TypeError, ValueError):
        return 1


def protocol_name(doc: Dict[str, Any]) -> str:
    p = doc.get("protocol") or {}
    return str(p.get("name") or V1_PROTOCOL)


def split_name(doc: Dict[str, Any]) -> str:
    """The split evaluated: train | validation | test; files written before splits were
    recorded (every one of them evaluated the test split) read as test."""
    split = doc.get("split")
    return str(split.get("name") or "test") if isinstance(split, dict) else "test"


def primary_scorer(doc: Dict[str, Any]) -> str:
    if doc.get("primary"):
        return str(doc["primary"])
    return str((doc.get("protocol") or {}).get("primary") or "strict")


def accuracy(doc: Dict[str, Any], scorer: Optional[str] = None) -> Optional[float]:
    value = (doc.get("accuracy") or {}).get(scorer or primary_scorer(doc))
    return None if value is None else float(value)


def correct_count(doc: Dict[str, Any], scorer: Optional[str] = None) -> Optional[int]:
    scorer = scorer or primary_scorer(doc)
    value = (doc.get("correct") or {}).get(scorer)
    if value is not None:
        return int(value)
    acc, n = accuracy(doc, scorer), total(doc)
    return None if acc is None else round(acc * n)


def total(doc: Dict[str, Any]) -> int:
    return int(doc.get("total") or 0)


def interval(doc: Dict[str, Any], scorer: Optional[str] = None) -> Optional[Tuple[float, float]]:
    """The recorded 95% interval, else a Wilson interval from correct/total (schema 1)."""
    scorer = scorer or primary_scorer(doc)
    ci = (doc.get("ci95") or {}).get(scorer)
    if ci:
        return float(ci[0]), float(ci[1])
    c = correct_count(doc, scorer)
    return None if c is None else wilson_interval(c, total(doc))


def scorers(doc: Dict[str, Any]) -> List[str]:
    return list((doc.get("accuracy") or {}).keys())


def record_key(record: Dict[str, Any], position: int) -> Tuple[Any, str]:
    """What identifies a problem across evaluations: its index in the test split and its text."""
    return record.get("index", position), str(record.get("question", ""))


def record_correct(record: Dict[str, Any], scorer: str) -> Optional[bool]:
    by_scorer = record.get("correct")
    if isinstance(by_scorer, dict):
        value = by_scorer.get(scorer)
    else:
        value = record.get(f"correct_{scorer}")  # schema 1: correct_strict, correct_lenient
    return None if value is None else bool(value)


def correctness(doc: Dict[str, Any], scorer: Optional[str] = None) -> Dict[Tuple[Any, str], bool]:
    """Per-problem correctness under `scorer` (default: the primary), keyed by record_key."""
    scorer = scorer or primary_scorer(doc)
    out = {}
    for i, rec in enumerate(doc.get("records") or []):
        value = record_correct(rec, scorer) if isinstance(rec, dict) else None
        if value is not None:
            out[record_key(rec, i)] = value
    return out


def headline(doc: Dict[str, Any]) -> str:
    """One line: protocol, primary scorer, accuracy, interval, count."""
    scorer, n = primary_scorer(doc), total(doc)
    acc, ci, c = accuracy(doc, scorer), interval(doc, scorer), correct_count(doc, scorer)
    if acc is None:
        return f"{protocol_name(doc)}: no accuracy"
    ci_txt = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    others = [s for s in ("strict", "lenient") if s != scorer and accuracy(doc, s) is not None]
    extra = "".join(f", {s} {100 * accuracy(doc, s):.1f}%" for s in others)  # type: ignore[operator]
    return f"{protocol_name(doc)}/{scorer} {100 * acc:.1f}%{ci_txt} ({c}/{n}){extra}"
