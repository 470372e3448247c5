"""finellama_rl.task.protocols: prompts of each protocol (qwen_boxed is Qwen's own
"qwen-boxed" template, byte for byte), SFT/few-shot targets that the protocol's own
scorer credits, defaults, stop strings, and training prompts built the same way."""
from __future__ import annotations

import pytest

from finellama_rl.config import EvalConfig, EvalProtocol
from finellama_rl.task.data import generate_arithmetic, with_prompts
from finellama_rl.task.protocols import (
    QWEN_INSTRUCTION, eval_max_new_tokens, eval_shots, prompt_format, protocol_spec, render_prompt, select_shots,
    solution_steps, stop_strings, target_text,
)
from finellama_rl.rewards.rules import build_reward_funcs
from finellama_rl.task.scoring import judge

GSM8K_REFS = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "The temperature is 7 - 12 = <<7-12=-5>>-5.\n#### -5",
    "Each gets 5/2 = <<5/2=2.5>>2.5 pizzas.\n#### 2.5",
    "He earns 1250 * 12 = <<1250*12=15000>>15000 dollars.\n#### 15,000",
]


@pytest.fixture(scope="module")
def tokenizer():
    from finellama_rl.compose import load_config
    from finellama_rl.job.model import load_tokenizer

    return load_tokenizer(load_config(["experiment=smoke"]).model)


def test_qwen_boxed_prompt_is_qwens_own_template(tokenizer):
    """QwenLM/Qwen2.5-Math evaluation/utils.py PROMPT_TEMPLATES["qwen-boxed"] with the question filled in
    (the tiny tokenizer's chat template renders messages the way Qwen2.5's does)."""
    question = "Janet's ducks lay 16 eggs per day. How many are left?"
    qwen_boxed = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n{input}\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
                  "<|im_start|>assistant\n")
    fmt = prompt_format(EvalProtocol.qwen_boxed, "ignored")
    assert render_prompt(tokenizer, fmt, question) == qwen_boxed.format(input=question)
    assert QWEN_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_qwen25_math_cot_prompt_is_qwen_math_evaluations_own_template(tokenizer):
    """QwenLM/Qwen2.5-Math evaluation/utils.py PROMPT_TEMPLATES["qwen25-math-cot"] (commit a45202b, copied
    verbatim below) with the question filled in: the instruction is the SYSTEM message, the user turn is the
    bare question; composed from the real conf/ with its 2048-token budget (math_eval.py --max_tokens_per_call)."""
    from finellama_rl.compose import load_config

    qwen25_math_cot = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
        "<|im_start|>user\n{input}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    cfg = load_config(["experiment=smoke", "eval.protocol=qwen25_math_cot", "eval.max_new_tokens=null"])
    fmt = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)
    for question in ("Janet's ducks lay 16 eggs per day. How many are left?", "What is {x} if x = 2?\nAnswer in $."):
        assert render_prompt(tokenizer, fmt, question) == qwen25_math_cot.format(input=question)
    assert render_prompt(tokenizer, fmt, "Q?") != render_prompt(tokenizer, prompt_format(EvalProtocol.qwen_boxed, ""), "Q?")
    assert (eval_max_new_tokens(cfg.eval), eval_shots(cfg.eval)) == (2048, 0)
    assert protocol_spec(cfg.eval.protocol).primary.value == "math_verify"
    assert stop_strings(fmt, tokenizer) == ["</s>", "<|im_end|>", "<|endoftext|>"]  # math_eval.py's stop_words


def test_finellama_prompt_uses_the_data_system_prompt(tokenizer):
    fmt = prompt_format(EvalProtocol.finellama, "End with '#### n'.")
    assert render_prompt(tokenizer, fmt, "What is 2+2?") == (
        "<|im_start|>system\nEnd with '#### n'.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_lm_eval_prompt_is_plain_text_with_shots():
    fmt = prompt_format(EvalProtocol.lm_eval_gsm8k, "ignored")
    shots = [{"question": "A?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}, {"question": "B?", "answer": "#### 3"}]
    assert render_prompt(None, fmt, "C?", shots) == (
        "Question: A?\nAnswer: 1 + 1 = <<1+1=2>>2\n#### 2\n\nQuestion: B?\nAnswer: #### 3\n\nQuestion: C?\nAnswer:")


@pytest.mark.parametrize("protocol", list(EvalProtocol))
def test_targets_are_credited_by_their_own_protocol(protocol):
    """target_text (SFT targets, few-shot turns) scores correct under the protocol's primary scorer
    and earns the correctness and format rewards, for GSM8K references and the synthetic task."""
    spec = protocol_spec(protocol)
    refs = GSM8K_REFS + [p["answer"] for p in generate_arithmetic(40, seed=3, max_operand=30)]
    correctness, fmt = build_reward_funcs(["correctness", "format"], protocol)
    targets = [target_text(protocol, ref) for ref in refs]
    assert all(judge(spec.primary, t, ref).correct for t, ref in zip(targets, refs))
    assert correctness(targets, answer=refs) == [1.0] * len(refs)
    assert fmt(targets) == [1.0] * len(refs)
    wrong = [target_text(protocol, refs[1])] * 3  # answers 10
    assert correctness(wrong, answer=refs[2:5]) == [0.0] * 3


def test_target_text_forms():
    ref = GSM8K_REFS[0]
    assert solution_steps(ref) == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    assert target_text(EvalProtocol.qwen_boxed, ref).endswith("\nThe final answer is $\\boxed{72}$.")
    assert target_text(EvalProtocol.finellama, ref).endswith("April and May.\n#### 72")
    assert target_text(EvalProtocol.lm_eval_gsm8k, ref) == ref  # the harness shows solutions verbatim
    assert target_text(EvalProtocol.qwen_boxed, GSM8K_REFS[3]).endswith("$\\boxed{\\frac{5}{2}}$.")
    assert target_text(EvalProtocol.qwen_boxed, "#### -3/4").endswith("$\\boxed{-\\frac{3}{4}}$.")
    assert target_text(EvalProtocol.qwen_boxed, "42") == "The final answer is $\\boxed{42}$."


def test_defaults_and_overrides():
    assert eval_shots(EvalConfig(protocol=EvalProtocol.lm_eval_gsm8k)) == 5
    assert eval_shots(EvalConfig(protocol=EvalProtocol.qwen_boxed)) == 0
    assert eval_shots(EvalConfig(protocol=EvalProtocol.lm_eval_gsm8k, shots=0)) == 0
    assert eval_max_new_tokens(EvalConfig(protocol=EvalProtocol.qwen_boxed)) == 1024
    assert eval_max_new_tokens(EvalConfig(protocol=EvalProtocol.lm_eval_gsm8k)) == 256
    assert eval_max_new_tokens(EvalConfig(max_new_tokens=16)) == 16
    assert EvalConfig().protocol == EvalProtocol.qwen_boxed and EvalConfig().num_examples == "all"


def test_stop_strings_add_the_eos_text(tokenizer):
    assert stop_strings(prompt_format(EvalProtocol.lm_eval_gsm8k, ""), tokenizer) == ["Question:", "</s>", "<|im_end|>"]
    qwen = stop_strings(prompt_format(EvalProtocol.qwen_boxed, ""), tokenizer)
    assert qwen == ["</s>", "<|im_end|>", "<|endoftext|>"]
    assert "\nQuestion:" in stop_strings(prompt_format(EvalProtocol.finellama, ""), tokenizer)


def test_shot_selection():
    train = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    first = select_shots(prompt_format(EvalProtocol.finellama, ""), train, 3, 2)
    assert first == [train[:2]] * 3
    lm = select_shots(prompt_format(EvalProtocol.lm_eval_gsm8k, ""), train, 4, 5)
    assert all(len(s) == 5 and len({x["question"] for x in s}) == 5 for s in lm) and lm[0] != lm[1]
    assert lm == select_shots(prompt_format(EvalProtocol.lm_eval_gsm8k, ""), train, 4, 5)  # seeded
    assert select_shots(prompt_format(EvalProtocol.lm_eval_gsm8k, ""), train, 2, 0) == [[], []]


def test_training_prompts_follow_the_protocol(tokenizer):
    problems = generate_arithmetic(6, seed=1, max_operand=9)
    for protocol in EvalProtocol:
        fmt = prompt_format(protocol, "Solve it. End with '#### <number>'.")
        rows, dropped = with_prompts(problems, tokenizer, fmt, max_prompt_tokens=4096)
        assert dropped == 0 and [r["prompt"] for r in rows] == [render_prompt(tokenizer, fmt, p["question"]) for p in problems]
    legacy, _ = with_prompts(problems, tokenizer, "Solve it. End with '#### <number>'.")  # a plain string: finellama
    assert legacy == with_prompts(problems, tokenizer, prompt_format(EvalProtocol.finellama, "Solve it. End with '#### <number>'."))[0]
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in legacy]
    kept, dropped = with_prompts(problems, tokenizer, "Solve it. End with '#### <number>'.", max_prompt_tokens=sorted(lengths)[2])
    assert dropped == sum(n > sorted(lengths)[2] for n in lengths) and len(kept) == 6 - dropped
