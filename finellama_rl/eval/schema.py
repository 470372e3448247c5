"""Reading eval documents of every schema version (eval_baseline.json,
eval_results.json, evals/*.json): which protocol and scorer, accuracy with its
95% interval, and per-problem correctness for paired tests.

Schema 2 (this release) names its protocol and primary scorer and records every
scorer; schema 1 (before) knew only the finellama `####` protocol, with strict as
its headline and lenient as a variant. Readers (index, report, status) go through
these functions, so both stay readable. Pure: no torch, cheap to import.

Every reader of an eval file goes through `read_eval_document` (or `check_document` for
a document it already holds), so index, status and report show the same numbers and
refuse the same ones: an accuracy is a finite number in [0, 1], a count of correct
answers an integer in [0, total], total an integer >= 1, a step an integer >= 0 (and at
most the run's max_steps when known), an interval [lo, hi] with 0 <= lo <= hi <= 1.
A value that breaks its rule is left out (unknown) and the file gets one warning line
that names it; a document whose step, total, primary accuracy or protocol is unusable
is not shown at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from finellama_rl.eval.statistics import wilson_interval
from finellama_rl.fileio import is_finite, is_whole, read_json_object, warn

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
    recorded (every one of them evaluated the test split) read as test. `split` is
    {"name": ..., "size": ...} as written, or the bare name."""
    split = doc.get("split")
    if isinstance(split, dict):
        split = split.get("name")
    return str(split) if isinstance(split, str) and split else "test"


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


# ------------------------------------------------------------------ validation (every reader)


def _fraction_problem(value: Any) -> Optional[str]:
    if not is_finite(value):
        return f"{value!r} is not a number"
    return None if 0.0 <= value <= 1.0 else f"{value!r} is outside [0, 1]"


def _check_header(doc: Dict[str, Any], max_step: Optional[int]) -> Optional[str]:
    """Why the document as a whole cannot be shown (step, total, schema, protocol), or None."""
    version = doc.get("schema_version", 1)
    if version is not None and (not is_whole(version) or not 1 <= version <= EVAL_SCHEMA_VERSION):
        return f"schema_version {version!r} is not one this version reads (1..{EVAL_SCHEMA_VERSION})"
    step = doc.get("step")
    if step is not None and (not is_whole(step) or step < 0 or (max_step is not None and step > max_step)):
        bound = f"[0, {max_step}]" if max_step is not None else ">= 0"
        return f"step {step!r} is not an integer {bound}"
    total = doc.get("total")
    if total is not None and (not is_whole(total) or total < 1):
        return f"total {total!r} is not an integer >= 1"
    protocol = doc.get("protocol")
    if protocol is not None and not (isinstance(protocol, dict) and isinstance(protocol.get("name", ""), str)):
        return f"protocol {str(protocol)[:40]!r} is not an object with a name"
    for key in ("primary", "checkpoint"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            return f"{key} {doc[key]!r} is not a string"
    return None


def _clean_scores(doc: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    """accuracy, correct and ci95 without the values that break their rules."""
    total = doc.get("total")
    accuracy, correct, ci95 = {}, {}, {}
    for name, value in doc["accuracy"].items():
        problem = _fraction_problem(value)
        if problem:
            problems.append(f"accuracy.{name}: {problem}")
        else:
            accuracy[str(name)] = float(value)
    for name, value in (doc.get("correct") or {}).items() if isinstance(doc.get("correct"), dict) else ():
        if is_whole(value) and 0 <= value and (total is None or value <= total):
            correct[str(name)] = value
        else:
            problems.append(f"correct.{name}: {value!r} is not an integer in [0, {total if total is not None else 'total'}]")
    for name, value in (doc.get("ci95") or {}).items() if isinstance(doc.get("ci95"), dict) else ():
        ok = value is None or (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_finite(v) for v in value)
                               and 0.0 <= value[0] <= value[1] <= 1.0)
        if ok:
            ci95[str(name)] = None if value is None else [float(value[0]), float(value[1])]
        else:
            problems.append(f"ci95.{name}: {str(value)[:40]} is not an interval within [0, 1]")
    return {**doc, "accuracy": accuracy, "correct": correct, "ci95": ci95, "pass_at_k": _clean_pass_at_k(doc, problems)}


def _clean_pass_at_k(doc: Dict[str, Any], problems: List[str]) -> Optional[Dict[str, Any]]:
    """pass_at_k ({scorer: {k: fraction}, samples, temperature}) without scorers whose values break the rules."""
    pk = doc.get("pass_at_k")
    if pk is None:
        return None
    if not isinstance(pk, dict) or not is_whole(pk.get("samples", 1)) or pk.get("samples", 1) < 1:
        problems.append("pass_at_k is not an object with a whole number of samples")
        return None
    clean = dict(pk)
    for name, values in pk.items():
        if not isinstance(values, dict) or name == "decoding":
            continue
        bad = next(((k, v) for k, v in values.items() if _fraction_problem(v)), None)
        if bad is not None:
            problems.append(f"pass_at_k.{name}.{bad[0]}: {_fraction_problem(bad[1])}")
            del clean[name]
    return clean


def check_document(doc: Any, max_step: Optional[int] = None) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """(the document with every out-of-rule value left out, or None when it cannot be
    shown; what was wrong). The rules are this module's docstring's; index, status and
    report all call this, so they agree."""
    if not isinstance(doc, dict):
        return None, [f"not a JSON object ({type(doc).__name__})"]
    if not isinstance(doc.get("accuracy"), dict):
        return None, ["no accuracy object"]
    header = _check_header(doc, max_step)
    if header:
        return None, [header]
    problems: List[str] = []
    clean = _clean_scores(doc, problems)
    if primary_scorer(clean) not in clean["accuracy"]:
        if not any(p.startswith(f"accuracy.{primary_scorer(clean)}:") for p in problems):
            problems.append(f"accuracy.{primary_scorer(clean)} (its primary scorer) is missing")
        return None, problems
    baseline = clean.get("baseline")
    if baseline is not None:  # the summary of the baseline embedded in a final evaluation
        clean["baseline"], inner = check_document(baseline, max_step)
        problems += [f"baseline: {p}" for p in inner]
    return clean, problems


def read_eval_document(path: Path, max_step: Optional[int] = None, quiet: bool = False) -> Optional[Dict[str, Any]]:
    """An eval file checked by `check_document`: the usable document (bad values left
    out), or None; one warning line naming the file and what is wrong (unless quiet)."""
    raw = read_json_object(path, "this evaluation", quiet=quiet)
    if raw is None:
        return None
    doc, problems = check_document(raw, max_step)
    if problems and not quiet:
        verdict = "not shown" if doc is None else "those values are not shown"
        warn(f"{path}: {'; '.join(problems[:3])}{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; {verdict}")
    return doc
