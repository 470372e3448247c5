"""finellama_rl.task.scoring on 176 hand-labelled GSM8K completions in 30 styles
(tests/fixtures/gsm8k_completions.jsonl): every protocol's verdict on every completion.

- lm_eval_gsm8k: the expected verdicts (and the text the harness keeps after its stop
  sequences, and what its filters extract) were produced by lm-evaluation-harness
  0.4.13's own code (scripts/regen_lm_eval_fixture.py); we must reproduce them exactly,
  and also its 5-shot prompts with its few-shot sampler.
- qwen_boxed (math-verify) and finellama (strict, lenient variant): pinned verdicts,
  every disagreement with the human label explained in scripts/make_completion_fixture.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finellama_rl.config import EvalProtocol
from finellama_rl.eval.core import score
from finellama_rl.task.protocols import prompt_format, protocol_spec, render_prompt, select_shots
from finellama_rl.task import lm_eval
from finellama_rl.rewards.rules import build_reward_funcs
from finellama_rl.task.scoring import Scorer, cut_at_stop, judge

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = [json.loads(line) for line in (FIXTURES / "gsm8k_completions.jsonl").read_text().splitlines() if line.strip()]
LM_EVAL = json.loads((FIXTURES / "gsm8k_completions_lm_eval.json").read_text())
EXPECTED = json.loads((FIXTURES / "gsm8k_completions_expected.json").read_text())
QWEN_EOS = "<|im_end|>"  # the eos text the fixture assumes (Qwen2.5-Instruct), added to every protocol's stops


def stops_of(protocol: EvalProtocol):
    stops = list(protocol_spec(protocol).stop_strings)
    return stops + ([QWEN_EOS] if QWEN_EOS not in stops else [])


def test_fixture_covers_the_styles():
    styles = {c["style"] for c in CASES}
    assert len(CASES) >= 150 and len(styles) >= 26
    for needed in ("boxed", "latex_inline", "hash_currency", "hash_units", "hash_commas", "hash_negative",
                   "hash_fraction", "prose", "trailing", "runon_question", "multi_hash", "empty_hash"):
        assert needed in styles
    assert sum(not c["label"] for c in CASES) >= 30  # wrong answers in most styles
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert LM_EVAL["lm_eval_version"] == lm_eval.LM_EVAL_VERSION and LM_EVAL["task_version"] == 3.0
    assert [r["id"] for r in LM_EVAL["results"]] == [c["id"] for c in CASES]


def test_lm_eval_constants_are_the_harness_task():
    assert LM_EVAL["until"] == [*lm_eval.STOP_SEQUENCES]  # <|im_end|> (eos) is already one of them
    assert LM_EVAL["generation_kwargs"] == {"until": list(lm_eval.STOP_SEQUENCES), "do_sample": False, "temperature": 0.0}
    assert (LM_EVAL["num_fewshot"], LM_EVAL["fewshot_seed"]) == (lm_eval.NUM_FEWSHOT, lm_eval.FEWSHOT_SEED)
    assert list(protocol_spec(EvalProtocol.lm_eval_gsm8k).stop_strings) == LM_EVAL["until"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_lm_eval_verdicts_reproduce_the_harness(case):
    expected = {r["id"]: r for r in LM_EVAL["results"]}[case["id"]]
    cut, _ = cut_at_stop(case["completion"], stops_of(EvalProtocol.lm_eval_gsm8k))
    assert cut == expected["cut"]
    assert lm_eval.strict_match(cut) == expected["strict-match"]["filtered"]
    assert lm_eval.flexible_extract(cut) == expected["flexible-extract"]["filtered"]
    assert judge(Scorer.lm_eval_strict, cut, case["reference"]).correct == bool(expected["strict-match"]["exact_match"])
    assert judge(Scorer.lm_eval_flexible, cut, case["reference"]).correct == bool(expected["flexible-extract"]["exact_match"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_qwen_boxed_and_finellama_verdicts(case):
    expected = EXPECTED["verdicts"][case["id"]]
    qwen = cut_at_stop(case["completion"], stops_of(EvalProtocol.qwen_boxed))[0]
    fine = cut_at_stop(case["completion"], stops_of(EvalProtocol.finellama))[0]
    assert judge(Scorer.math_verify, qwen, case["reference"]).correct == expected["qwen_boxed"]
    assert judge(Scorer.strict, fine, case["reference"]).correct == expected["finellama"]
    assert judge(Scorer.lenient, fine, case["reference"]).correct == expected["finellama_lenient"]
    if expected["qwen_boxed"] != case["label"]:
        assert case["id"] in EXPECTED["notes"]["qwen_boxed"], "an unexplained math-verify disagreement"


def agreement(verdicts, labels):
    return sum(v == l for v, l in zip(verdicts, labels)) / len(labels)


def test_math_verify_agrees_with_the_labels_far_more_than_strict():
    labels = [c["label"] for c in CASES]
    by = {k: [EXPECTED["verdicts"][c["id"]][k] for c in CASES] for k in ("qwen_boxed", "finellama", "finellama_lenient")}
    lm = [bool(r["strict-match"]["exact_match"]) for r in LM_EVAL["results"]]
    assert agreement(by["qwen_boxed"], labels) > agreement(by["finellama_lenient"], labels) > agreement(by["finellama"], labels)
    assert agreement(by["qwen_boxed"], labels) >= 0.85 and agreement(lm, labels) < 0.5


def test_lm_eval_prompts_equal_the_harness_contexts():
    """Our 5-shot prompts, shots drawn like the harness's sampler, equal its contexts byte for byte."""
    train = json.loads((FIXTURES / "lm_eval_train_docs.json").read_text())["train"]
    fmt = prompt_format(EvalProtocol.lm_eval_gsm8k, "unused")
    shots = select_shots(fmt, train, len(CASES), lm_eval.NUM_FEWSHOT)
    ours = [render_prompt(None, fmt, c["question"], s) for c, s in zip(CASES, shots)]
    assert ours == LM_EVAL["contexts"]
    assert len({tuple(x["question"] for x in s) for s in shots}) > 100  # different shots per problem, as the harness


# ------------------------------------------------------------------ one function for train and eval

BOXED_ONLY = "48 / 2 = 24 clips in May, 48 + 24 = 72 in all.\nThe final answer is $\\boxed{72}$."
CLIPS = next(c["reference"] for c in CASES if c["id"] == "001-boxed")


def test_boxed_only_answer_earns_reward_1_and_counts_in_eval_under_qwen_boxed():
    correctness, fmt = build_reward_funcs(["correctness", "format"], EvalProtocol.qwen_boxed)
    assert correctness([BOXED_ONLY], answer=[CLIPS]) == [1.0]
    assert fmt([BOXED_ONLY]) == [1.0]
    assert correctness([[{"role": "assistant", "content": BOXED_ONLY}]], answer=[CLIPS]) == [1.0]  # conversational
    result = score([{"question": "q", "answer": CLIPS}], [BOXED_ONLY], Scorer.math_verify, stops_of(EvalProtocol.qwen_boxed))
    assert result["primary"] == "math_verify" and result["correct"]["math_verify"] == 1 and result["accuracy"]["math_verify"] == 1.0
    assert result["correct"]["strict"] == 0  # the old rule credited none of these
    legacy = build_reward_funcs(["correctness"], EvalProtocol.finellama)[0]
    assert legacy([BOXED_ONLY], answer=[CLIPS]) == [0.0]


RUN_ON = {  # protocol: (completion that answers 70, then invents a question answered 72; reward for ref 70)
    EvalProtocol.finellama: ("48 + 24 = 70\n#### 70\n\nQuestion: What is 70 + 2?\nAnswer: 72\n#### 72", 1.0),
    # lm-eval's strict-match takes the FIRST '####': a run-on decides only when the answer itself lacks one
    EvalProtocol.lm_eval_gsm8k: (" 48 + 24 = 70 clips.\n\nQuestion: What is 70 + 2?\nAnswer: 72\n#### 72", 0.0),
    EvalProtocol.qwen_boxed: ("48 + 24 = 70, so \\boxed{70}<|im_end|>\n<|im_start|>user\nAdd 2.<|im_end|>\n"
                              "<|im_start|>assistant\n\\boxed{72}", 1.0),
    EvalProtocol.qwen25_math_cot: ("48 + 24 = 70, so \\boxed{70}<|im_end|>\n<|im_start|>user\nAdd 2.<|im_end|>\n"
                                   "<|im_start|>assistant\n\\boxed{72}", 1.0),
}


@pytest.mark.parametrize("protocol", list(EvalProtocol))
def test_run_on_completion_is_cut_at_the_stop_string_before_scoring(protocol):
    text, own = RUN_ON[protocol]
    spec = protocol_spec(protocol)
    assert judge(spec.primary, text, "#### 72").correct is True  # uncut, the invented question would be credited
    reward = build_reward_funcs(["correctness"], protocol)[0]
    assert reward([text], answer=["#### 72"]) == [0.0]  # cut at the stop string first: never credited
    assert reward([text], answer=["#### 70"]) == [own]  # scored on its own answer
    result = score([{"question": "q", "answer": "#### 72"}, {"question": "q", "answer": "#### 70"}], [text, text],
                   spec.primary, stops_of(protocol))
    assert result["correct"][spec.primary.value] == int(own)
    assert all(r["finish"].startswith("stop:") and "72" not in r["completion"] for r in result["records"])
