"""GSM8K answer extraction and numeric comparison, in pure Python (stdlib only).

* ``normalize_number`` turns a number as written ("$1,234.50", "3/4", "42.",
  "-7 km", "50%", LaTeX's "\\$45") into one canonical string through ``fractions.Fraction``:
  integers as "123", everything else as a reduced fraction "3/4" (so 0.75 and
  3/4 agree, and 2.0 and 2 agree).
* ``extract_strict`` reads the number after the last ``####`` (GSM8K's format, the
  finellama protocol's "strict" scorer); ``extract_lenient`` reads the last number
  anywhere (the "lenient" variant).
* ``reference_answer`` reads a GSM8K reference solution exactly like GSM8K's own
  extract_answer (checked on all 8,792 train+test answers).

The scorers that use these live in scoring.py; the reward functions in rules.py.
"""
from __future__ import annotations

import re
from enum import Enum
from fractions import Fraction
from typing import Optional

__all__ = [
    "Extraction", "normalize_number", "extract_strict", "extract_lenient", "extract_answer",
    "reference_answer", "is_correct",
]

ANSWER_MARKER = "####"
_MINUS_SIGNS = "-\u2212"  # ASCII hyphen-minus and the unicode minus sign
_CURRENCY = "$\u20ac\u00a3\u00a5"  # $ € £ ¥

# One number as written: an optional sign (not glued to a preceding word or
# digit, so "5-3" is 5 and 3, not 5 and -3), an optional currency sign (which
# may be followed by the sign: "$-5"; LaTeX's escaped dollar in "#### \$45"
# counts as one), then, not right after a digit, either a simple fraction a/b
# (b != 0) or an integer/decimal whose thousands separators are commas between
# groups of exactly three digits.
_NUMBER_RE = re.compile(
    rf"""
    (?:(?<![\w.])(?P<sign>[+\-\u2212]))?
    (?:(?:\\\$|[{_CURRENCY}])\s?(?P<sign2>[\-\u2212])?)?
    (?<!\d)
    (?:
        (?P<num>\d+)/(?P<den>\d*[1-9]\d*)
      | (?=\.?\d)
        (?P<int>\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)?
        (?P<frac>\.\d+)?
    )
    """,
    re.VERBOSE,
)
# What may not follow a whole number: another digit, or a separator and a
# digit ("1,2" or "1.2.3" are not one number).
_BAD_TAIL_RE = re.compile(r"\d|[.,/]\d")


class Extraction(str, Enum):
    """How to read the final answer out of a completion."""

    STRICT = "strict"    # the number after the last "####"
    LENIENT = "lenient"  # the last number anywhere


def _render(value: Fraction) -> str:
    """Canonical text of a value: "123" for integers, reduced "3/4" otherwise."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _match_value(match: re.Match[str]) -> Fraction:
    """The value of a ``_NUMBER_RE`` match."""
    if match.group("num") is not None:
        value = Fraction(int(match.group("num")), int(match.group("den")))
    else:
        integer = (match.group("int") or "0").replace(",", "")
        value = Fraction(integer + (match.group("frac") or ""))
    negative = (match.group("sign") or "+") in _MINUS_SIGNS
    if match.group("sign2") is not None:
        negative = not negative
    return -value if negative else value


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of a number written at the start of ``text``, else None.

    Whitespace, currency signs, thousands separators, a trailing period or
    other punctuation, and units or words after the number are ignored:
    "$1,234.50" -> "2469/2", "42 dollars" -> "42", "50%" -> "50", "2.0" -> "2".
    Text before the number ("= 18") is not skipped: that is the extractors' job.
    """
    stripped = text.strip()
    match = _NUMBER_RE.match(stripped)
    if match is None:
        return None
    if _BAD_TAIL_RE.match(stripped, match.end()):
        return None
    return _render(_match_value(match))


def extract_strict(text: str) -> Optional[str]:
    """The normalized number right after the last "####" on its line, else None."""
    position = text.rfind(ANSWER_MARKER)
    if position < 0:
        return None
    line = text[position + len(ANSWER_MARKER):].split("\n", 1)[0]
    return normalize_number(line.lstrip(" \t:=*"))


def extract_lenient(text: str) -> Optional[str]:
    """The last number anywhere in ``text``, normalized; None if there is none."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return None if last is None else _render(_match_value(last))


def extract_answer(text: str, rule: Extraction) -> Optional[str]:
    """Extract the final answer from ``text`` with the given rule."""
    if rule == Extraction.STRICT:
        return extract_strict(text)
    if rule == Extraction.LENIENT:
        return extract_lenient(text)
    raise ValueError(f"unknown extraction {rule!r}: expected strict|lenient")


def reference_answer(gsm8k_answer: str) -> str:
    """The normalized answer of a GSM8K solution ("... #### 72") or bare number ("72")."""
    if ANSWER_MARKER in gsm8k_answer:
        answer = extract_strict(gsm8k_answer)
    else:
        answer = normalize_number(gsm8k_answer)
    if answer is None:
        shown = gsm8k_answer if len(gsm8k_answer) <= 200 else gsm8k_answer[-200:]
        raise ValueError(f"no '#### <number>' answer in reference {shown!r}")
    return answer


def is_correct(predicted: Optional[str], reference: str) -> bool:
    """Whether ``predicted`` equals ``reference`` as numbers (None never does)."""
    if predicted is None:
        return False
    left, right = normalize_number(predicted), normalize_number(reference)
    if left is None or right is None:
        return False
    return Fraction(left) == Fraction(right)
