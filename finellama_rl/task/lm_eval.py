"""lm-evaluation-harness's GSM8K scoring, reproduced: its two filters and its
exact_match metric, exactly as lm-eval 0.4 computes them (gsm8k.yaml, task
version 3.0), so that our `lm_eval_gsm8k` numbers can be put next to lm-eval
tables without running the harness.

What the harness does to one completion (lm_eval/models/utils.py
`postprocess_generated_text`, lm_eval/filters/extraction.py `RegexFilter`,
lm_eval/filters/selection.py `TakeFirstFilter`, lm_eval/api/metrics.py
`exact_match_hf_evaluate`):

1. cut the completion at the first stop sequence (`Question:`, `</s>`,
   `<|im_end|>`, and the model's eos text);
2. strict-match: the FIRST match of `#### (\\-?[0-9\\.\\,]+)`;
   flexible-extract: the LAST match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (its first
   non-empty group); `.strip()`ed; "[invalid]" when nothing matches;
3. exact match against the whole reference solution after deleting `,`, `$`,
   everything up to the last `#### ` and a final `.` from both, ignoring case.

tests/test_scoring.py checks this module against verdicts that lm-eval's own code
produced on tests/fixtures/gsm8k_completions.jsonl (scripts/regen_lm_eval_fixture.py).
Pure stdlib.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

LM_EVAL_VERSION = "0.4.13"  # the harness version whose gsm8k.yaml this reproduces (task version 3.0)
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml generation_kwargs.until
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"  # filter "strict-match": regex (group_select 0) + take_first
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # filter "flexible-extract": regex (group_select -1) + take_first
IGNORE_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")  # exact_match regexes_to_ignore, applied in this order
FALLBACK = "[invalid]"
DOC_TO_TEXT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
NUM_FEWSHOT = 5
FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED, the evaluator's fewshot_random_seed

_STRICT_RE = re.compile(STRICT_PATTERN)
_FLEXIBLE_RE = re.compile(FLEXIBLE_PATTERN)


def cut_at_stop_sequences(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """What lm-eval's HF backend keeps of a generation: text before the first stop sequence."""
    for term in stops:
        if term:
            text = text.split(term)[0]
    return text


def _regex_filter(text: str, pattern: re.Pattern[str], group_select: int) -> str:
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first non-empty one
        non_empty = [m for m in match if m]
        match = non_empty[0] if non_empty else FALLBACK
    return match.strip()


def strict_match(text: str) -> str:
    """The strict-match filter's output for one completion ("[invalid]" when none)."""
    return _regex_filter(text, _STRICT_RE, 0)


def flexible_extract(text: str) -> str:
    """The flexible-extract filter's output for one completion ("[invalid]" when none)."""
    return _regex_filter(text, _FLEXIBLE_RE, -1)


def normalize(text: str) -> str:
    """exact_match's view of a string: ignored patterns deleted, lower case."""
    for pattern in IGNORE_PATTERNS:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match (ignore_case, no punctuation stripping) for one pair.

    `reference` is the whole GSM8K solution (gsm8k.yaml's doc_to_target is "{{answer}}").
    numpy compares unicode arrays with trailing NULs dropped; so do we."""
    return normalize(prediction).rstrip("\x00") == normalize(reference).rstrip("\x00")


def filtered(text: str, flexible: bool) -> str:
    return flexible_extract(text) if flexible else strict_match(text)


def extracted_answer(text: str, flexible: bool) -> Optional[str]:
    """The filter's answer, or None where lm-eval would compare "[invalid]"."""
    out = filtered(text, flexible)
    return None if out == FALLBACK else out
