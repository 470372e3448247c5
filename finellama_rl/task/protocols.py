"""Evaluation protocols: how a GSM8K problem becomes a prompt, where generation
stops, and which scorer decides correctness. One protocol (`eval.protocol`)
governs the baseline, every evaluation during and after training, the training
prompt and the correctness/format rewards, so that what training rewards is what
evaluation credits, and a number can be put next to the source it names.

- qwen_boxed: Qwen's own GSM8K recipe for Qwen2.5 models (QwenLM/Qwen2.5-Math,
  evaluation/utils.py, PROMPT_TEMPLATES["qwen-boxed"]): chat template, system
  "You are a helpful assistant.", user "<question>\\nPlease reason step by step, and
  put your final answer within \\boxed{}.", zero-shot, greedy; scored by math-verify.
- qwen25_math_cot: Qwen2.5-Math's evaluation default (QwenLM/Qwen2.5-Math,
  evaluation/utils.py PROMPT_TEMPLATES["qwen25-math-cot"], math_eval.py
  --max_tokens_per_call 2048): chat template, the same instruction as the SYSTEM
  message, the bare question as the user turn, zero-shot, greedy, up to 2048 new
  tokens; scored by math-verify.
- lm_eval_gsm8k: lm-evaluation-harness 0.4's `gsm8k` task: no chat template,
  5 shots "Question: <q>\\nAnswer: <solution>" separated by blank lines, shots drawn
  like the harness (random.Random(1234), five per test problem in order), stops at
  "Question:", "</s>", "<|im_end|>" and eos; primary score strict-match, with
  flexible-extract recorded (task/lm_eval.py).
- finellama: this project's first protocol (schema-1 eval files): data.system_prompt
  asking for "#### <number>", chat template, zero-shot; primary score strict; now
  also stops at "\nQuestion:" (schema 1 had no stop strings).

Every scorer (task/scoring.py) is computed on every evaluation, so variants stay
comparable; `primary` names the headline one.

For SFT and few-shot prompts, `target_text(protocol, solution)` is the text a perfect
model writes under a protocol for a reference solution (GSM8K "... #### 72").

    fmt = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)
    prompt = render_prompt(tokenizer, fmt, problem["question"], shots=[])
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import Algo, EvalConfig, EvalProtocol, TrainerConfig
from finellama_rl.task import lm_eval
from finellama_rl.task.extraction import reference_answer
from finellama_rl.task.scoring import Scorer

Problem = Dict[str, str]

QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHAT_STOPS = ("</s>", "<|im_end|>", "<|endoftext|>")  # Qwen2.5-Math evaluation/math_eval.py stop_words
FINELLAMA_STOPS = CHAT_STOPS + ("\nQuestion:",)  # also cut a run-on into an invented next question
BOXED_PROTOCOLS = (EvalProtocol.qwen_boxed, EvalProtocol.qwen25_math_cot)  # answers in \boxed{}: targets, format reward
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


@dataclass(frozen=True)
class ProtocolSpec:
    name: EvalProtocol
    chat_template: bool
    """Prompts go through the tokenizer's chat template (else plain text)."""
    system_prompt: Optional[str]
    """The system message (None: none; finellama takes data.system_prompt)."""
    user_template: str
    """The user turn (chat) or the whole question block (plain); {question} is replaced."""
    default_shots: int
    shot_selection: str
    """first: the first N training problems for every prompt; lm_eval: N per problem from random.Random(1234)."""
    stop_strings: Tuple[str, ...]
    primary: Scorer
    max_new_tokens: int
    source: str


SPECS: Dict[EvalProtocol, ProtocolSpec] = {
    EvalProtocol.qwen_boxed: ProtocolSpec(
        EvalProtocol.qwen_boxed, True, QWEN_SYSTEM_PROMPT, "{question}\n" + QWEN_INSTRUCTION, 0, "first", CHAT_STOPS,
        Scorer.math_verify, 1024,
        "QwenLM/Qwen2.5-Math evaluation/utils.py PROMPT_TEMPLATES['qwen-boxed'] (chat, zero-shot CoT, greedy), "
        "scored with HF math-verify"),
    EvalProtocol.qwen25_math_cot: ProtocolSpec(
        EvalProtocol.qwen25_math_cot, True, QWEN_INSTRUCTION, "{question}", 0, "first", CHAT_STOPS,
        Scorer.math_verify, 2048,
        "QwenLM/Qwen2.5-Math evaluation/utils.py PROMPT_TEMPLATES['qwen25-math-cot'] (chat, the instruction as the "
        "system message, zero-shot CoT, greedy, math_eval.py --max_tokens_per_call 2048), scored with HF math-verify"),
    EvalProtocol.lm_eval_gsm8k: ProtocolSpec(
        EvalProtocol.lm_eval_gsm8k, False, None, lm_eval.DOC_TO_TEXT, lm_eval.NUM_FEWSHOT, "lm_eval",
        lm_eval.STOP_SEQUENCES, Scorer.lm_eval_strict, 256,
        f"lm-evaluation-harness {lm_eval.LM_EVAL_VERSION} tasks/gsm8k/gsm8k.yaml (version 3.0), "
        "exact_match,strict-match (flexible-extract recorded)"),
    EvalProtocol.finellama: ProtocolSpec(
        EvalProtocol.finellama, True, None, "{question}", 0, "first", FINELLAMA_STOPS, Scorer.strict, 256,
        "finellama_rl schema-1 protocol: data.system_prompt asks for '#### <number>'; strict"),
}


@dataclass(frozen=True)
class PromptFormat:
    """A protocol with its system prompt resolved (finellama's comes from data.system_prompt)."""

    spec: ProtocolSpec
    system_prompt: Optional[str]

    @property
    def protocol(self) -> EvalProtocol:
        return self.spec.name


def protocol_spec(protocol: EvalProtocol) -> ProtocolSpec:
    try:
        return SPECS[EvalProtocol(protocol)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown eval protocol {protocol!r}: expected {'|'.join(p.value for p in EvalProtocol)}") from None


def prompt_format(protocol: EvalProtocol, data_system_prompt: str) -> PromptFormat:
    spec = protocol_spec(protocol)
    system = data_system_prompt if spec.name == EvalProtocol.finellama else spec.system_prompt
    return PromptFormat(spec, system)


def eval_shots(ev: EvalConfig) -> int:
    return protocol_spec(ev.protocol).default_shots if ev.shots is None else ev.shots


def eval_max_new_tokens(ev: EvalConfig) -> int:
    return protocol_spec(ev.protocol).max_new_tokens if ev.max_new_tokens is None else ev.max_new_tokens


TRAINING_SHOTS = 0  # training prompts never carry shots (task/data.py: with_prompts)
SAMPLING_TRAINERS = (Algo.grpo, Algo.ppo)  # rewarded within trainer.max_completion_tokens


def budget_record(trainer: TrainerConfig, ev: EvalConfig) -> Dict[str, Any]:
    """The training and the evaluation budget and shots, as every eval document records them
    (`budgets`): a reader sees at once whether evaluation credited what training could not earn."""
    return {"training": {"trainer": Algo(trainer.algo).value, "max_completion_tokens": trainer.max_completion_tokens,
                         "shots": TRAINING_SHOTS},
            "evaluation": {"protocol": EvalProtocol(ev.protocol).value, "max_new_tokens": eval_max_new_tokens(ev),
                           "shots": eval_shots(ev)}}


def budget_mismatches(trainer: TrainerConfig, ev: EvalConfig) -> List[Tuple[str, str]]:
    """(key, message) for each way a run's evaluation differs from what its training saw: a
    generation budget (eval.max_new_tokens, else the protocol's) other than the RL trainers'
    sampling budget (trainer.max_completion_tokens), and shots where training is zero-shot.
    launch prints them as warnings at planning time; nothing is refused."""
    out: List[Tuple[str, str]] = []
    train_tokens, eval_tokens, shots = trainer.max_completion_tokens, eval_max_new_tokens(ev), eval_shots(ev)
    source = "eval.max_new_tokens" if ev.max_new_tokens is not None else f"the {EvalProtocol(ev.protocol).value} default"
    if trainer.algo in SAMPLING_TRAINERS and eval_tokens != train_tokens:
        why = (f"an answer longer than {train_tokens} tokens earns reward 0 in training but can be credited in evaluation"
               if eval_tokens > train_tokens else f"evaluation cuts answers that training let run to {train_tokens} tokens")
        out.append(("eval.max_new_tokens", f"evaluation generates up to {eval_tokens} new tokens ({source}) but training "
                    f"samples at most {train_tokens} (trainer.max_completion_tokens): {why}; set "
                    f"eval.max_new_tokens={train_tokens} to evaluate at the training budget"))
    if trainer.algo in (*SAMPLING_TRAINERS, Algo.sft) and shots != TRAINING_SHOTS:
        out.append(("eval.shots", f"evaluation prompts carry {shots} worked examples "
                    f"({'eval.shots' if ev.shots is not None else f'the {EvalProtocol(ev.protocol).value} default'}) but "
                    f"training prompts are zero-shot; set eval.shots=0 to evaluate the prompt format training saw"))
    return out


# ------------------------------------------------------------------ targets


def _boxed(number: str) -> str:
    value = Fraction(number)
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def solution_steps(solution: str) -> str:
    """The worked steps of a GSM8K solution: the text before `####`, calculator annotations removed."""
    body = solution.rsplit("####", 1)[0] if "####" in solution else ""
    return _CALCULATOR_RE.sub("", body).strip()


def target_text(protocol: EvalProtocol, solution: str) -> str:
    """What a perfect model writes under `protocol` for a reference solution ("... #### 72").

    qwen_boxed, qwen25_math_cot: the steps, then "The final answer is $\\boxed{72}$."; finellama: the steps,
    then "#### 72"; lm_eval_gsm8k: the solution verbatim, annotations included (what the
    harness shows in its shots). Calculator annotations (<<48/2=24>>) are removed except
    for lm_eval_gsm8k. Used for few-shot turns and as SFT targets."""
    protocol = EvalProtocol(protocol)
    if protocol == EvalProtocol.lm_eval_gsm8k:
        return solution
    answer, steps = reference_answer(solution), solution_steps(solution)
    prefix = f"{steps}\n" if steps else ""
    if protocol in BOXED_PROTOCOLS:
        return f"{prefix}The final answer is $\\boxed{{{_boxed(answer)}}}$."
    if protocol == EvalProtocol.finellama:
        return f"{prefix}#### {answer}"
    raise ValueError(f"unknown eval protocol {protocol!r}: expected {'|'.join(p.value for p in EvalProtocol)}")


# ------------------------------------------------------------------ prompts


def select_shots(fmt: PromptFormat, train: Sequence[Problem], num_problems: int, shots: int) -> List[List[Problem]]:
    """The shots of each of the first `num_problems` test problems, in order.

    lm_eval: like the harness, one random.Random(1234) draws `shots` training problems
    per test problem in test order (so problem i gets the same shots as in `lm_eval
    --tasks gsm8k`); otherwise the first `shots` training problems for all."""
    if shots <= 0:
        return [[] for _ in range(num_problems)]
    if shots > len(train):
        raise ValueError(f"{shots} shots asked but only {len(train)} training problems")
    if fmt.spec.shot_selection == "lm_eval":
        rng = random.Random(lm_eval.FEWSHOT_SEED)
        return [[train[j] for j in rng.sample(range(len(train)), shots)] for _ in range(num_problems)]
    return [list(train[:shots]) for _ in range(num_problems)]


def user_text(fmt: PromptFormat, question: str) -> str:
    """The user turn (or plain question block) for a question ({question} replaced, no str.format:
    the qwen instruction holds literal braces)."""
    return fmt.spec.user_template.replace("{question}", question)


def build_messages(fmt: PromptFormat, question: str, shots: Sequence[Problem] = ()) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    for shot in shots:
        msgs += [{"role": "user", "content": user_text(fmt, shot["question"])},
                 {"role": "assistant", "content": target_text(fmt.protocol, shot["answer"])}]
    return msgs + [{"role": "user", "content": user_text(fmt, question)}]


def render_prompt(tokenizer, fmt: PromptFormat, question: str, shots: Sequence[Problem] = ()) -> str:
    """The exact prompt text for a question under a protocol."""
    if fmt.spec.chat_template:
        return tokenizer.apply_chat_template(build_messages(fmt, question, shots), tokenize=False, add_generation_prompt=True)
    turns = [user_text(fmt, s["question"]) + lm_eval.TARGET_DELIMITER
             + target_text(fmt.protocol, s["answer"]) + lm_eval.FEWSHOT_DELIMITER for s in shots]
    return "".join(turns) + user_text(fmt, question)


def stop_strings(fmt: PromptFormat, tokenizer) -> List[str]:
    """The protocol's stop strings plus the tokenizer's eos text (as lm-eval adds it)."""
    stops = list(fmt.spec.stop_strings)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def prompt_template_text(fmt: PromptFormat) -> str:
    """A human-readable description of the template, for the protocol record."""
    if fmt.spec.chat_template:
        system = f"system: {fmt.system_prompt!r}; " if fmt.system_prompt else ""
        return f"chat template: {system}[shots as user/assistant turns]; user: {fmt.spec.user_template!r}; assistant"
    return (f"plain text: shots as {fmt.spec.user_template!r} + {lm_eval.TARGET_DELIMITER!r} + solution + "
            f"{lm_eval.FEWSHOT_DELIMITER!r}, then {fmt.spec.user_template!r}")
