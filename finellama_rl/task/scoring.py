"""One interface for every way of deciding whether a completion answers a GSM8K
problem correctly. Evaluation (finellama_rl/eval) and the training rewards
(rules.py) both call `judge`, so what training rewards and what evaluation
credits is one function.

Scorers (`Scorer`):
- math_verify: HF's math-verify (math_verify_scorer.py): boxed, LaTeX, prose or the
  last number, compared by value. The scorer of the qwen_boxed protocol.
- strict: the number after the last `####` (rules.py). The finellama protocol's.
- lenient: the last number anywhere (rules.py). A named variant for comparison.
- lm_eval_strict / lm_eval_flexible: lm-evaluation-harness's strict-match and
  flexible-extract filters with its exact_match (lm_eval.py). The lm_eval_gsm8k protocol's.

Completions are cut at the protocol's stop strings before any scorer sees them
(`cut_at_stop`): a completion that runs on into an invented next question is
scored on what it answered, not on the invented one.

    from finellama_rl.task.scoring import Scorer, judge
    judge(Scorer.math_verify, "... \\\\boxed{72}", "... #### 72").correct   # True
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, Optional, Sequence, Tuple

from finellama_rl.task import lm_eval
from finellama_rl.task.extraction import extract_lenient, extract_strict, is_correct, reference_answer


class Scorer(str, Enum):
    math_verify = "math_verify"
    strict = "strict"
    lenient = "lenient"
    lm_eval_strict = "lm_eval_strict"
    lm_eval_flexible = "lm_eval_flexible"


ALL_SCORERS: Tuple[Scorer, ...] = tuple(Scorer)
SCORER_DESCRIPTIONS: Dict[str, str] = {
    Scorer.math_verify.value: "math-verify: answer from \\boxed{}, LaTeX, 'final answer' phrases or the last number, "
                              "equal in value to the reference (math_verify.parse/verify)",
    Scorer.strict.value: "the number after the last '####' on its line, equal in value to the reference",
    Scorer.lenient.value: "the last number in the completion, equal in value to the reference",
    Scorer.lm_eval_strict.value: f"lm-eval {lm_eval.LM_EVAL_VERSION} gsm8k strict-match: first "
                                 f"'{lm_eval.STRICT_PATTERN}', exact_match ignoring {list(lm_eval.IGNORE_PATTERNS)}, case",
    Scorer.lm_eval_flexible.value: f"lm-eval {lm_eval.LM_EVAL_VERSION} gsm8k flexible-extract: last "
                                   f"'{lm_eval.FLEXIBLE_PATTERN}', exact_match ignoring {list(lm_eval.IGNORE_PATTERNS)}, case",
}


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: Optional[str]  # the answer the scorer read (None: it found none)


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(text before the earliest stop string, the stop string that cut it or None)."""
    best, which = len(text), None
    for stop in stops:
        i = text.find(stop) if stop else -1
        if 0 <= i < best:
            best, which = i, stop
    return text[:best], which


def judge(scorer: Scorer, completion: str, solution: str) -> Verdict:
    """Whether `completion` answers correctly under `scorer`.

    `solution` is the problem's reference: a GSM8K solution ending in `#### <n>` or a
    bare number. The completion should already be cut at the protocol's stop strings."""
    scorer = Scorer(scorer)
    if scorer in (Scorer.lm_eval_strict, Scorer.lm_eval_flexible):
        flexible = scorer == Scorer.lm_eval_flexible
        return Verdict(lm_eval.exact_match(lm_eval.filtered(completion, flexible), solution),
                       lm_eval.extracted_answer(completion, flexible))
    reference = reference_answer(solution)
    if scorer == Scorer.math_verify:
        from finellama_rl.task.math_verify_scorer import verify_answer

        ok, extracted = verify_answer(completion, reference)
        return Verdict(ok, extracted)
    if scorer == Scorer.strict:
        extracted = extract_strict(completion)
    elif scorer == Scorer.lenient:
        extracted = extract_lenient(completion)
    else:
        raise ValueError(f"unknown scorer {scorer!r}: expected one of {'|'.join(s.value for s in Scorer)}")
    return Verdict(is_correct(extracted, reference), extracted)


def judge_all(completion: str, solution: str, scorers: Sequence[Scorer] = ALL_SCORERS) -> Dict[str, Verdict]:
    return {Scorer(s).value: judge(s, completion, solution) for s in scorers}


def scorer_versions() -> Dict[str, Optional[str]]:
    """Versions of what scores: math-verify and its stack, and the lm-eval release reproduced."""
    from finellama_rl.task.math_verify_scorer import versions

    return {**versions(), "lm-eval (reproduced, not imported)": lm_eval.LM_EVAL_VERSION}
