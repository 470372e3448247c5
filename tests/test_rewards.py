"""Tests for finellama_rl.rewards: answer extraction, normalization and the reward
functions of each protocol (tests/test_scoring.py covers the scorers on 176 labelled
completions).

The extraction table pins the exact output of both extraction rules on the
kinds of text GSM8K references and model completions contain.
"""
from __future__ import annotations

import pytest

from finellama_rl.config import RULE_REWARDS, EvalProtocol
from finellama_rl.rewards.rules import (
    REWARD_FUNCS, Extraction, boxed_content, build_reward_funcs, digit_reward, extract_answer, extract_lenient,
    extract_strict, is_correct, normalize_number, reference_answer,
)

correctness_reward, format_reward = build_reward_funcs(["correctness", "format"], EvalProtocol.finellama)

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)

# (text, extract_strict, extract_lenient)
EXTRACTION_TABLE = [
    ("$1,234.50", None, "2469/2"),
    ("#### 1,000", "1000", "1000"),
    ("#### -5", "-5", "-5"),
    ("#### 3/4", "3/4", "3/4"),
    ("#### $18.", "18", "18"),
    ("The answer is 42 dollars.", None, "42"),
    ("The answer is 42.", None, "42"),
    ("\u22127", None, "-7"),
    ("+3", None, "3"),
    (".5", None, "1/2"),
    ("50%", None, "50"),
    ("10 km", None, "10"),
    ("3.0", None, "3"),
    ("no number here", None, None),
    ("", None, None),
    ("#### 5\n#### 7", "7", "7"),
    ("#### 12 then #### 13", "13", "13"),
    ("Reasoning without an answer.\n####", None, None),
    ("She had 3 apples and 4 pears.\n#### ", None, "4"),
    ("####\n42", None, "42"),
    ("#### The answer is 5", None, "5"),
    ("She has 3 + 4 = 7 apples, 7 * 2 = 14, plus 4 is 18.\n#### 18", "18", "18"),
    (GSM8K_SOLUTION, "72", "72"),
    ("2 + 3 = 5, 5 * 4 = 20", None, "20"),
    ("1,2,3", None, "3"),
    ("#### 1,2", None, "2"),
    ("#### 1,2345", None, "2345"),
    ("In 2023 she was 35.", None, "35"),
    ("The year was 1999", None, "1999"),
    ("#### 2024", "2024", "2024"),
    ("#### 123456789012345678901234567890",
     "123456789012345678901234567890", "123456789012345678901234567890"),
    ("#### 1,000,000,000,000", "1000000000000", "1000000000000"),
    ("The total is (18).", None, "18"),
    ("#### 18)", "18", "18"),
    ("#### 42,", "42", "42"),
    ("**#### 18**", "18", "18"),
    ("####: 9", "9", "9"),
    ("#### 0.75", "3/4", "3/4"),
    ("#### 2.0", "2", "2"),
    ("#### 4.50\n", "9/2", "9/2"),
    ("#### -0.5", "-1/2", "-1/2"),
    ("#### 1,234,567 people", "1234567", "1234567"),
    ("#### \u221212", "-12", "-12"),
    ("#### +8", "8", "8"),
    ("#### \u20ac 4.25", "17/4", "17/4"),
    ("#### \u00a33", "3", "3"),
    ("#### $-5", "-5", "-5"),
    ("#### \\$45", "45", "45"),  # LaTeX's escaped dollar (issue 21)
    ("#### \\$1,250.50", "2501/2", "2501/2"),
    ("#### -\\$5", "-5", "-5"),
    ("It costs \\$7 each", None, "7"),
    ("#### \\45", None, "45"),  # a backslash before a digit is no currency sign
    ("It costs -$7.", None, "-7"),
    ("$0.50 each", None, "1/2"),
    ("x = -3", None, "-3"),
    ("5-3 = 2", None, "2"),
    ("pages 3-4", None, "4"),
    ("#### 0", "0", "0"),
    ("#### 007", "7", "7"),
    ("#### 10%", "10", "10"),
    ("#### 1.2.3", None, "3"),
    ("#### 3/4/2023", None, "2023"),
    ("#### 7 apples\nExtra text 99", "7", "99"),
    ("Step 1: 2 x 3 = 6\n#### 6", "6", "6"),
]


def test_table_is_large_enough() -> None:
    assert len(EXTRACTION_TABLE) >= 40


@pytest.mark.parametrize(("text", "strict", "lenient"), EXTRACTION_TABLE)
def test_extraction_table(text: str, strict: str | None, lenient: str | None) -> None:
    assert extract_strict(text) == strict
    assert extract_lenient(text) == lenient
    assert extract_answer(text, Extraction.STRICT) == strict
    assert extract_answer(text, Extraction.LENIENT) == lenient


@pytest.mark.parametrize(("text", "expected"), [
    ("0.75", "3/4"), ("3/4", "3/4"), ("6/8", "3/4"), ("2.0", "2"), ("2", "2"),
    ("4/2", "2"), (".5", "1/2"), ("1/2", "1/2"), ("0.50", "1/2"),
    ("1,234,567", "1234567"), ("  42  ", "42"), ("42 dollars", "42"), ("42.", "42"),
    ("-0", "0"), ("\u22127", "-7"), ("$-5", "-5"), ("-$5", "-5"), ("+3", "3"), ("\\$45", "45"),
    ("1,2", None), ("1.2.3", None), ("12/0", None), ("= 18", None), ("abc", None), ("", None),
])
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


def test_normalize_equivalences() -> None:
    assert normalize_number("0.75") == normalize_number("3/4")
    assert normalize_number("2.0") == normalize_number("2")
    assert normalize_number("$1,000.00") == normalize_number("1000")
    assert normalize_number("0.5") != normalize_number("5")


@pytest.mark.parametrize(("predicted", "reference", "expected"), [
    ("18", "18", True), ("18.0", "18", True), ("3/4", "0.75", True), ("1,000", "1000", True),
    ("-5", "-5", True), (None, "18", False), ("17", "18", False), ("-5", "5", False),
    ("abc", "1", False), ("1/3", "0.33", False),
])
def test_is_correct(predicted: str | None, reference: str, expected: bool) -> None:
    assert is_correct(predicted, reference) is expected


def test_reference_answer() -> None:
    assert reference_answer(GSM8K_SOLUTION) == "72"
    assert reference_answer("72") == "72"
    assert reference_answer(" 1,000 ") == "1000"
    assert reference_answer("So the total is $1,250.\n#### 1,250") == "1250"


@pytest.mark.parametrize("text", ["no answer here", "Some work.\n#### ", ""])
def test_reference_answer_errors_name_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="no '#### <number>' answer in reference") as info:
        reference_answer(text)
    assert repr(text) in str(info.value)


def test_extraction_enum_and_dispatch_errors() -> None:
    assert Extraction("strict") is Extraction.STRICT
    assert Extraction.LENIENT == "lenient"
    assert extract_answer("#### 5 then 6", "strict") == "5"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown extraction 'fuzzy': expected strict\|lenient"):
        extract_answer("#### 5", "fuzzy")  # type: ignore[arg-type]


STRING_COMPLETIONS = ["So 18.\n#### 18", "#### 17", "It is 18", ""]
STRING_ANSWERS = ["She pays 9 * 2 = <<9*2=18>>18.\n#### 18", "18", "18", "18"]


def test_rewards_on_string_completions() -> None:
    assert correctness_reward(STRING_COMPLETIONS, answer=STRING_ANSWERS) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(STRING_COMPLETIONS, answer=STRING_ANSWERS) == [1.0, 1.0, 0.0, 0.0]
    assert digit_reward(STRING_COMPLETIONS) == [4 / 11, 1 / 3, 1 / 3, 0.0]
    assert digit_reward(["123", "   ", "a b"]) == [1.0, 0.0, 0.0]


def test_rewards_on_conversational_completions() -> None:
    completions = [
        [{"role": "assistant", "content": "3/4 of it.\n#### 0.75"}],
        [{"role": "user", "content": "#### 18"}, {"role": "assistant", "content": "18"}],
        [{"role": "assistant", "content": "#### 1,000"}],
    ]
    answers = ["3/4", "#### 18", "Total: 1,000 apples.\n#### 1000"]
    kwargs = {"prompts": ["p"] * 3, "question": ["q"] * 3}
    assert correctness_reward(completions, answer=answers, **kwargs) == [1.0, 0.0, 1.0]
    assert format_reward(completions, **kwargs) == [1.0, 0.0, 1.0]
    assert digit_reward(completions, **kwargs) == [5 / 16, 1.0, 4 / 9]


def test_correctness_reward_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        correctness_reward(["#### 1", "#### 2"], answer=["1"])


def test_build_reward_funcs() -> None:
    funcs = build_reward_funcs(["format", "correctness", "digits"], EvalProtocol.qwen_boxed)
    assert [f.__name__ for f in funcs] == ["format_reward", "correctness_reward", "digit_reward"]
    assert funcs[2] is digit_reward
    assert build_reward_funcs([]) == []
    assert set(REWARD_FUNCS) == {"correctness", "format", "digits"} == set(RULE_REWARDS)  # validation knows them by name
    with pytest.raises(ValueError, match=r"unknown reward 'accuracy': expected one of correctness\|format\|digits"):
        build_reward_funcs(["correctness", "accuracy"])


@pytest.mark.parametrize(("protocol", "expected"), [
    (EvalProtocol.qwen_boxed, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]),  # math-verify: box, else the last number
    (EvalProtocol.finellama, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]),
    (EvalProtocol.lm_eval_gsm8k, [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
])
def test_rewards_follow_the_protocol(protocol, expected) -> None:
    """The same completions earn correctness by each protocol's own scorer (reference 18)."""
    completions = ["So \\boxed{18}.", "$$\\boxed{\\$18.00}$$", "#### 18", "#### $18", "It is 18.",
                   "\\boxed{18} from 7 days", "#### 18 in 7 days"]
    correctness = build_reward_funcs(["correctness"], protocol)[0]
    assert correctness(completions, answer=["#### 18"] * 7) == expected


def test_format_reward_per_protocol() -> None:
    texts = ["\\boxed{\\frac{3}{4}}", "\\boxed{}", "#### 5", "#### $5", "5"]
    assert build_reward_funcs(["format"], EvalProtocol.qwen_boxed)[0](texts) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert build_reward_funcs(["format"], EvalProtocol.finellama)[0](texts) == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert build_reward_funcs(["format"], EvalProtocol.lm_eval_gsm8k)[0](texts) == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert boxed_content("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}" and boxed_content("\\boxed{12") is None
