"""Answer checking by mathematical equivalence through HF's math-verify (a
maintained library, not more regexes): the final answer is extracted from
`\\boxed{}`, LaTeX (`$...$`, `\\(...\\)`, `\\frac{3}{4}`), "final answer is"
phrases or, failing those, the last number, and compared with the reference
by value (0.75 = 3/4 = 75%, 18.00 = 18).

    from finellama_rl.task.math_verify_scorer import verify_answer
    verify_answer("... so the total is \\boxed{72}.", "72")   # (True, "72")

Traps handled here:
- math-verify bounds its parsing and comparison time with signal.alarm, which
  raises outside the main thread; there we run without a timeout.
- Its `parse` returns [sympy value, text] or []; we keep the text as the
  "extracted" answer for per-example records.
- The reference is built from its exact rational value, never parsed, so a
  reference can never be misread.
"""
from __future__ import annotations

import logging
import threading
from fractions import Fraction
from typing import Optional, Tuple

TIMEOUT_S = 5
logging.getLogger("math_verify").setLevel(logging.ERROR)  # one warning per unparsable completion is noise


def _timeout_s() -> Optional[int]:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def gold_value(reference: str):
    """The reference ("72", "-5", "3/4": a normalized number) as an exact sympy Rational."""
    import sympy

    value = Fraction(reference)
    return sympy.Rational(value.numerator, value.denominator)


def verify_answer(completion: str, reference: str) -> Tuple[bool, Optional[str]]:
    """(correct, extracted text) for a completion against a normalized reference number."""
    from math_verify import parse, verify

    timeout = _timeout_s()
    parsed = parse(completion, parsing_timeout=timeout)
    if not parsed:
        return False, None
    extracted = str(parsed[-1]) if isinstance(parsed[-1], str) else str(parsed[0])
    ok = bool(verify([gold_value(reference)], parsed, timeout_seconds=timeout))
    return ok, extracted


def versions() -> dict:
    """Versions of the scoring stack (recorded in every eval JSON)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("math-verify", "latex2sympy2_extended", "sympy", "antlr4-python3-runtime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
