"""Write tests/fixtures/gsm8k_completions.jsonl: hand-written GSM8K completions in the
styles models produce (boxed, LaTeX, `####` with currency/units/commas/negatives/
fractions/decimals, prose, trailing text, run-on questions, several `####`, ...), each
with a human label (is the answer it gives to the asked question right?).

    .venv/bin/python scripts/make_completion_fixture.py          # rewrites the fixture
    .venv/bin/python scripts/make_completion_fixture.py --pin    # and pins our protocols' verdicts

Expected verdicts: for lm_eval_gsm8k they come from lm-eval's own code
(scripts/regen_lm_eval_fixture.py -> gsm8k_completions_lm_eval.json). For qwen_boxed
(math-verify) and finellama (strict, lenient) `--pin` writes what our scorers say to
gsm8k_completions_expected.json; every verdict that differs from the human label was
reviewed and is explained in MISS_NOTES below (a new disagreement without a note
fails the pin, so it must be looked at).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gsm8k_completions.jsonl"

REF = {
    "clips": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    "weng": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "shoes": "The shoes cost 3 * 15 = $<<3*15=45>>45 in total.\n#### 45",
    "pages": "He reads 4 * 250 = <<4*250=1000>>1000 pages.\n#### 1000",
    "temp": "The temperature fell by 12 degrees from 7, so it is 7 - 12 = <<7-12=-5>>-5.\n#### -5",
    "pizza": "Each friend gets 5/2 = <<5/2=2.5>>2.5 pizzas.\n#### 2.5",
    "discount": "The discount is 8 / 40 * 100 = <<8/40*100=20>>20 percent.\n#### 20",
    "eggs": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18",
    "big": "The company earns 1250 * 12 = <<1250*12=15000>>15000 dollars a year.\n#### 15000",
}

QUESTION = {
    "clips": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "weng": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "shoes": "Tom buys 3 pairs of shoes at $15 a pair. How much does he pay?",
    "pages": "Sam reads 250 pages a day for 4 days. How many pages does he read?",
    "temp": "The temperature was 7 degrees and fell by 12 degrees. What is the temperature now?",
    "pizza": "Two friends share 5 pizzas equally. How many pizzas does each friend get?",
    "discount": "A $40 shirt is sold for $32. What percent is the discount?",
    "eggs": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "big": "A company earns $1250 a month. How much does it earn in a year?",
}

CASES = []


def add(style: str, ref: str, completion: str, label: bool, note: str = "") -> None:
    CASES.append({"id": f"{len(CASES) + 1:03d}-{style}", "style": style, "question": QUESTION[ref], "reference": REF[ref],
                  "completion": completion, "label": label, "note": note})


# 1 boxed at the end
add("boxed", "clips", "In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 24 = 72 clips.\nThe final answer is $\\boxed{72}$.", True)
add("boxed", "eggs", "She has 16 - 3 - 4 = 9 eggs left. 9 * 2 = 18 dollars.\n\\boxed{18}", True)
add("boxed", "weng", "12 dollars per hour is 0.2 dollars per minute, so 50 minutes pay 10 dollars.\n\nTherefore, Weng earned \\boxed{10} dollars.", True)
add("boxed", "clips", "48 / 2 = 24, and 48 + 24 = 72.\nSo the answer is \\boxed{70}.", False, "arithmetic slip in the box")
add("boxed", "shoes", "Three pairs at 15 dollars each cost 3 * 15 = 45.\n\\boxed{45}", True)
add("boxed", "pages", "250 pages a day for 4 days is 1000 pages.\n\\boxed{1000}", True)
add("boxed", "eggs", "16 - 3 - 4 = 9 and 9 * 2 = 18.\nThe answer is \\boxed{ 18 }.", True)
add("boxed", "big", "1250 * 12 = 15000\n\\boxed{15000}", True)
# 2 boxed in display math
add("boxed_display", "clips", "She sold 24 in May, so the total is\n$$\\boxed{72}$$", True)
add("boxed_display", "eggs", "Daily income:\n\\[\n9 \\times 2 = \\boxed{18}\n\\]", True)
add("boxed_display", "weng", "\\[\n\\text{Earnings} = 0.2 \\times 50 = \\boxed{10}\n\\]", True)
add("boxed_display", "shoes", "$$3 \\times 15 = \\boxed{35}$$", False)
# 3 boxed followed by prose with other numbers
add("boxed_then_prose", "clips", "She sold 48 + 24 = 72.\n\\boxed{72} clips were sold over 2 months.", True, "lenient reads the 2")
add("boxed_then_prose", "eggs", "So \\boxed{18} dollars is what she makes each day, 7 days a week.", True, "lenient reads the 7")
add("boxed_then_prose", "weng", "\\boxed{10}\n\nNote: this assumes she is paid for all 50 minutes.", True, "lenient reads the 50")
add("boxed_then_prose", "pages", "He reads \\boxed{1000} pages in 4 days.", True, "lenient reads the 4")
add("boxed_then_prose", "shoes", "The total is \\boxed{45}. (That is 3 pairs.)", True)
add("boxed_then_prose", "clips", "\\boxed{24} clips in May, and 72 in total over the two months.", False, "boxed the intermediate value")
# 4 boxed with units or currency
add("boxed_units", "clips", "48 + 24 = 72\n\\boxed{72 \\text{ clips}}", True)
add("boxed_units", "shoes", "3 * 15 = 45\n\\boxed{\\$45}", True)
add("boxed_units", "shoes", "The shoes cost \\boxed{45 \\text{ dollars}} in total.", True)
add("boxed_units", "eggs", "She makes \\boxed{\\$18.00} per day.", True)
add("boxed_units", "pages", "\\boxed{1000\\text{ pages}}", True)
add("boxed_units", "weng", "\\boxed{\\$12}", False)
# 5 boxed fractions and decimals
add("boxed_fraction", "pizza", "5 pizzas shared by 2 friends: \\boxed{\\frac{5}{2}}", True)
add("boxed_fraction", "pizza", "Each friend gets \\boxed{2.5} pizzas.", True)
add("boxed_fraction", "pizza", "Each gets \\boxed{2\\frac{1}{2}} pizzas.", True, "mixed number")
add("boxed_fraction", "pizza", "\\boxed{\\dfrac{5}{2}}", True)
add("boxed_fraction", "pizza", "\\boxed{\\frac{2}{5}}", False)
add("boxed_fraction", "weng", "0.2 per minute times 50 is \\boxed{10.0}", True)
# 6 boxed with thousands separators
add("boxed_commas", "pages", "4 * 250 = 1,000\n\\boxed{1,000}", True)
add("boxed_commas", "big", "1,250 * 12 = 15,000\n\\boxed{15,000}", True)
add("boxed_commas", "big", "\\boxed{15{,}000}", True, "LaTeX thin-comma separator")
add("boxed_commas", "pages", "\\boxed{1\\,000}", True, "LaTeX thin-space separator")
add("boxed_commas", "big", "\\boxed{1,500}", False)
# 7 boxed negatives
add("boxed_negative", "temp", "7 - 12 = -5, so it is \\boxed{-5} degrees.", True)
add("boxed_negative", "temp", "The temperature is \\boxed{5} degrees below zero.", False, "sign dropped")
add("boxed_negative", "temp", "\\boxed{-5^\\circ}", True)
# 8 #### plain
add("hash", "clips", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", True)
add("hash", "eggs", "16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18", True)
add("hash", "weng", "She earns 12/60 = 0.2 dollars per minute, so 0.2 * 50 = 10.\n#### 10", True)
add("hash", "shoes", "3 * 15 = 45\n#### 45", True)
add("hash", "clips", "48 / 2 = 24\n48 + 24 = 72\n#### 71", False)
add("hash", "big", "1250 * 12 = 15000\n####15000", True, "no space after ####")
add("hash", "pages", "4 * 250 = 1000\n#### 1000\n", True)
add("hash", "eggs", "She sells 9 eggs at 2 dollars each.\n#### 9", False, "answered the intermediate")
# 9 #### with currency
add("hash_currency", "shoes", "3 * 15 = 45 dollars.\n#### $45", True)
add("hash_currency", "shoes", "3 \\times 15 = 45\n#### \\$45", True, "escaped dollar sign")
add("hash_currency", "eggs", "9 * 2 = 18\n#### $18.00", True)
add("hash_currency", "weng", "0.2 * 50 = 10\n#### $10", True)
add("hash_currency", "weng", "#### $ 10", True, "space after the currency sign")
add("hash_currency", "eggs", "#### \u00a318", True, "pound sign")
add("hash_currency", "shoes", "#### $54", False)
# 10 #### with units
add("hash_units", "shoes", "3 * 15 = 45\n#### 45 dollars", True)
add("hash_units", "clips", "#### 72 clips", True)
add("hash_units", "pages", "#### 1000 pages", True)
add("hash_units", "weng", "#### 10 dollars and 0 cents", True, "the trailing 0 misleads last-number rules")
add("hash_units", "temp", "#### -5 degrees", True)
add("hash_units", "discount", "#### 20%", True)
add("hash_units", "discount", "#### 20 percent", True)
# 11 #### with commas
add("hash_commas", "pages", "4 * 250 = 1,000\n#### 1,000", True)
add("hash_commas", "big", "#### 15,000", True)
add("hash_commas", "big", "#### $15,000", True)
add("hash_commas", "big", "#### 15,000.00", True)
add("hash_commas", "big", "#### 150,000", False)
# 12 #### negatives
add("hash_negative", "temp", "7 - 12 = -5\n#### -5", True)
add("hash_negative", "temp", "#### \u22125", True, "unicode minus")
add("hash_negative", "temp", "#### 5", False)
add("hash_negative", "temp", "#### - 5", True, "space after the minus")
# 13 #### fractions and decimals
add("hash_fraction", "pizza", "5 / 2 = 2.5\n#### 2.5", True)
add("hash_fraction", "pizza", "#### 5/2", True)
add("hash_fraction", "pizza", "#### 2.50", True)
add("hash_fraction", "pizza", "#### 2 1/2", True, "mixed number")
add("hash_fraction", "pizza", "#### \\frac{5}{2}", True)
add("hash_fraction", "weng", "#### 10.0", True)
add("hash_fraction", "weng", "#### 10.", True, "trailing period")
add("hash_fraction", "pizza", "#### 0.4", False)
# 14 #### with wrappers
add("hash_wrapped", "eggs", "#### \\(18\\)", True)
add("hash_wrapped", "eggs", "#### (18)", True)
add("hash_wrapped", "eggs", "#### \\boxed{18}", True)
add("hash_wrapped", "eggs", "#### **18**", True)
add("hash_wrapped", "eggs", "**#### 18**", True)
add("hash_wrapped", "eggs", "#### $18$", True, "inline math")
add("hash_wrapped", "eggs", "####: 18", True)
add("hash_wrapped", "eggs", "#### Answer: 18", True)
add("hash_wrapped", "eggs", "#### The answer is 18.", True)
add("hash_wrapped", "eggs", "#### (17)", False)
# 15 "the answer is"
add("prose_answer_is", "clips", "48 + 24 = 72. The answer is 72.", True)
add("prose_answer_is", "eggs", "Janet makes 18 dollars a day. The answer is 18", True)
add("prose_answer_is", "weng", "The answer is: 10", True)
add("prose_answer_is", "shoes", "The answer is 45 dollars.", True)
add("prose_answer_is", "pages", "The answer is 1000 pages.", True)
add("prose_answer_is", "clips", "The answer is 24.", False)
add("prose_answer_is", "temp", "The answer is -5 degrees.", True)
add("prose_answer_is", "pizza", "The answer is 2.5.", True)
# 16 "Answer:" lines
add("answer_colon", "clips", "48/2 = 24; 48 + 24 = 72\nAnswer: 72", True)
add("answer_colon", "eggs", "Final answer: 18", True)
add("answer_colon", "shoes", "Answer: $45", True)
add("answer_colon", "big", "Answer: 15,000", True)
add("answer_colon", "weng", "Answer: 12", False)
# 17 prose final sentence
add("prose", "clips", "In May she sold half as many, 24. So she sold 72 clips in total.", True)
add("prose", "eggs", "Janet makes 18 dollars every day at the market.", True)
add("prose", "weng", "Weng earned 10 dollars for 50 minutes of babysitting.", True, "last number is the 50")
add("prose", "shoes", "So the three pairs cost forty-five dollars.", True, "number in words")
add("prose", "pages", "He reads one thousand pages.", True, "number in words")
add("prose", "clips", "Natalia sold 72 clips.", True)
add("prose", "eggs", "She has 9 eggs left to sell.", False)
add("prose", "temp", "It is now 5 degrees below zero.", True, "negative in words")
# 18 trailing text after the answer
add("trailing", "clips", "48 + 24 = 72\n#### 72\nI hope this helps! Let me know if you have 3 more questions.", True)
add("trailing", "eggs", "#### 18\n\nExplanation: 16 eggs minus 7 used leaves 9.", True)
add("trailing", "weng", "\\boxed{10}\n\nFeel free to ask 2 follow-up questions.", True)
add("trailing", "shoes", "#### 45\n(3 pairs x 15)", True)
add("trailing", "pages", "The answer is 1000.\nThat is 4 days of reading 250 pages.", True)
add("trailing", "clips", "#### 72\n\nNote: 24 of them were sold in May.", True)
add("trailing", "eggs", "The final answer is $18$. I hope it is correct.\nExtra: eggs cost 2 each.", True)
# 19 run-on into an invented next question (lm-eval style)
add("runon_question", "clips", "48/2 = 24\n48 + 24 = 72\n#### 72\n\nQuestion: Tom has 5 apples and eats 3. How many are left?\nAnswer: 5 - 3 = 2\n#### 2", True)
add("runon_question", "eggs", "16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18\nQuestion: A train travels 60 miles in 2 hours. What is its speed?\nAnswer: 60 / 2 = 30\n#### 30", True)
add("runon_question", "weng", "0.2 * 50 = 10\n#### 10\n\nQuestion: What is 7 * 8?\nAnswer: 56", True)
add("runon_question", "shoes", "3 * 15 = 45\n#### 45\n\nQuestion: Ann buys 2 pens at $3. What does she pay?\nAnswer: #### 6", True)
add("runon_question", "clips", "48 + 24 = 70\n#### 70\n\nQuestion: What is 70 + 2?\nAnswer: 72\n#### 72", False, "wrong answer, then an invented question answered 72")
add("runon_question", "pages", "4 * 250 = 1000 pages.\n\nQuestion: Sam reads 20 pages a day for 3 days. How many pages?\nAnswer: 60", True, "no #### before the run-on")
add("runon_question", "big", "1250 * 12 = 15000\n#### 15000\nQuestion: How many months are in 2 years?\nAnswer: 24\n#### 24", True)
add("runon_question", "temp", "It is 7 - 12 = -5 degrees.\n#### -5\n\nQuestion: What is 3 - 8?\nAnswer: -5 ... wait\n#### 3", True)
# 20 run-on past the chat end-of-turn token
add("runon_chat", "clips", "48 + 24 = 72\n\\boxed{72}<|im_end|>\n<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n<|im_start|>assistant\n\\boxed{8}", True)
add("runon_chat", "eggs", "#### 18<|im_end|>\n<|im_start|>user\nAnd per week?<|im_end|>\n<|im_start|>assistant\n18 * 7 = 126\n#### 126", True)
add("runon_chat", "weng", "The answer is 10.<|endoftext|>Human: what is 2+2?\nAssistant: 4", True)
add("runon_chat", "shoes", "3 * 15 = 45\n#### 45</s>\nQuestion: What is 1 + 1?\n#### 2", True)
add("runon_chat", "clips", "\\boxed{70}<|im_end|>\n<|im_start|>user\nCheck again.<|im_end|>\n<|im_start|>assistant\n\\boxed{72}", False, "wrong first answer; the corrected one is in an invented turn")
# 21 several ####
add("multi_hash", "clips", "#### 70\nWait, I made a mistake: 48 + 24 = 72.\n#### 72", True, "the last one is the answer")
add("multi_hash", "clips", "48 + 24 = 72\n#### 72\nHmm, let me recheck... no, 48 + 24 = 70\n#### 70", False, "the last one is the answer")
add("multi_hash", "eggs", "#### 9 eggs are left\n9 * 2 = 18\n#### 18", True)
add("multi_hash", "shoes", "#### 45\n#### 45", True)
add("multi_hash", "weng", "#### 0.2 per minute\n#### 10", True)
add("multi_hash", "pages", "#### 250 pages per day\n#### 1000", True)
# 22 empty trailing ####
add("empty_hash", "clips", "48 + 24 = 72 clips.\n####", True, "the answer is in the text; nothing after ####")
add("empty_hash", "eggs", "She makes 18 dollars.\n#### ", True)
add("empty_hash", "weng", "Weng earned 10 dollars.\n####\n", True)
add("empty_hash", "shoes", "The total is 45.\n#### \n", True)
# 23 LaTeX inline / display without box
add("latex_inline", "clips", "The total is $72$.", True)
add("latex_inline", "eggs", "She makes \\(18\\) dollars.", True)
add("latex_inline", "weng", "Weng earned \\[10\\] dollars.", True)
add("latex_inline", "pizza", "Each friend gets $\\frac{5}{2}$ pizzas.", True)
add("latex_inline", "pizza", "Each friend gets \\(\\frac{5}{2}\\) of a pizza... I mean $2.5$ pizzas.", True)
add("latex_inline", "temp", "The temperature is $-5^{\\circ}$.", True)
add("latex_inline", "shoes", "The cost is $\\$45$.", True)
add("latex_inline", "clips", "The total is $70$.", False)
# 24 LaTeX equation as the last line
add("latex_equation", "clips", "The total is $48 + 24 = 72$.", True)
add("latex_equation", "eggs", "$$(16 - 3 - 4) \\times 2 = 18$$", True)
add("latex_equation", "weng", "$\\frac{12}{60} \\times 50 = 10$", True)
add("latex_equation", "pizza", "$5 \\div 2 = 2.5$", True)
add("latex_equation", "shoes", "$3 \\times 15 = 54$", False)
# 25 percentages
add("percent", "discount", "The discount is 8/40 = 20%.", True)
add("percent", "discount", "\\boxed{20\\%}", True)
add("percent", "discount", "#### 20 %", True)
add("percent", "discount", "The answer is 0.2.", False, "a fraction, not a percentage")
# 26 no answer / refusal
add("no_answer", "clips", "I'm sorry, I cannot solve this problem.", False)
add("no_answer", "eggs", "", False)
add("no_answer", "weng", "Let's think step by step.", False)
add("no_answer", "shoes", "####", False)
# 27 boxed and #### disagree
add("boxed_vs_hash", "clips", "\\boxed{70}\n#### 72", True, "the last stated answer is 72")
add("boxed_vs_hash", "clips", "#### 70\n\\boxed{72}", True, "the last stated answer is 72")
add("boxed_vs_hash", "eggs", "\\boxed{18}\n#### 9", False, "the last stated answer is 9")
# 28 "final answer is" phrasing
add("final_answer_phrase", "clips", "The final answer is 72. I hope it is correct.", True)
add("final_answer_phrase", "eggs", "Therefore, the final answer is: $18$.", True)
add("final_answer_phrase", "weng", "My final answer is 10 dollars, based on 50 minutes.", True)
add("final_answer_phrase", "shoes", "The final answer is 54. I hope it is correct.", False)
# 29 spaced thousands and other separators
add("separators", "big", "#### 15 000", True, "space as thousands separator")
add("separators", "big", "The answer is 15.000 dollars.", True, "European thousands separator")
add("separators", "pages", "#### 1.000", True, "European thousands separator")
add("separators", "pages", "The answer is 1000.00.", True)
# 30 answer-only completions
add("bare", "clips", "72", True)
add("bare", "eggs", "18.", True)
add("bare", "weng", "$10", True)
add("bare", "pizza", "5/2", True)
add("bare", "temp", "-5", True)
add("bare", "shoes", "54", False)


EXPECTED = OUT.with_name("gsm8k_completions_expected.json")
# Why a protocol's scorer disagrees with the label (reviewed by hand, 2026-11-30).
MISS_NOTES = {
    "qwen_boxed": {
        "034-boxed_commas": "math-verify leaves a LaTeX thin space (1\\,000) unparsed",
        "057-hash_units": "no box: math-verify falls back to the last number (0 cents)",
        "067-hash_negative": "math-verify does not read the unicode minus sign",
        "069-hash_negative": "'- 5' with a space reads as 5",
        "073-hash_fraction": "mixed number '2 1/2' is not parsed as 5/2",
        "079-hash_wrapped": "'#### (18)' yields no extraction",
        "103-prose": "no box: last number (50)",
        "104-prose": "number in words",
        "105-prose": "number in words",
        "108-prose": "'5 degrees below zero' reads as 5",
        "109-trailing": "'####' is no anchor for math-verify: the last number (3) wins",
        "110-trailing": "'####' is no anchor for math-verify: the last number (9) wins",
        "112-trailing": "'####' is no anchor for math-verify: the last number (15) wins",
        "114-trailing": "'####' is no anchor for math-verify: the last number (24) wins",
        "116-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "117-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "118-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "119-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "120-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer (72) is credited",
        "121-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "122-runon_question": "Qwen's recipe has no 'Question:' stop: the invented question's answer wins",
        "153-percent": "math-verify reads \\boxed{20\\%} as 0.2",
        "160-boxed_vs_hash": "a box outranks a later '#### 72'",
        "162-boxed_vs_hash": "a box (18) outranks a later '#### 9'",
        "168-separators": "'15.000' is a decimal to math-verify",
        "169-separators": "'1.000' is a decimal to math-verify",
    },
}


def pin() -> None:
    """Write our protocols' verdicts; refuse when a disagreement with the label has no note."""
    sys.path.insert(0, str(OUT.parent.parent.parent))
    from finellama_rl.config import EvalProtocol
    from finellama_rl.task.protocols import protocol_spec
    from finellama_rl.task.scoring import Scorer, cut_at_stop, judge

    verdicts, unexplained = {}, []
    for case in CASES:
        row = {}
        for key, protocol, scorer in (("qwen_boxed", EvalProtocol.qwen_boxed, None),
                                      ("finellama", EvalProtocol.finellama, None),
                                      ("finellama_lenient", EvalProtocol.finellama, Scorer.lenient)):
            spec = protocol_spec(protocol)
            text = cut_at_stop(case["completion"], spec.stop_strings + ("<|im_end|>",))[0]
            row[key] = judge(scorer or spec.primary, text, case["reference"]).correct
            if key == "qwen_boxed" and row[key] != case["label"] and case["id"] not in MISS_NOTES["qwen_boxed"]:
                unexplained.append(case["id"])
        verdicts[case["id"]] = row
    if unexplained:
        raise SystemExit(f"qwen_boxed disagrees with the label without a note: {unexplained}")
    doc = {"what": "expected verdicts of the qwen_boxed (math-verify) and finellama (strict; lenient variant) "
                   "protocols on gsm8k_completions.jsonl, after cutting at the protocol's stop strings",
           "command": ".venv/bin/python scripts/make_completion_fixture.py --pin", "notes": MISS_NOTES,
           "verdicts": verdicts}
    EXPECTED.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"pinned {len(verdicts)} x 3 verdicts -> {EXPECTED}")


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for case in CASES:
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    styles = sorted({c["style"] for c in CASES})
    print(f"{len(CASES)} completions in {len(styles)} styles -> {OUT}")
    if "--pin" in sys.argv[1:]:
        pin()


if __name__ == "__main__":
    main()
