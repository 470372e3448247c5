"""Rule-based reward functions for RL (PPO, GRPO), built for an evaluation protocol.

Why: the correctness reward must be the evaluation's own verdict. Under the
qwen_boxed protocol a completion answering `\\boxed{72}` earns 1 in training and
counts as correct in evaluation, because both call `scoring.judge` with the
protocol's primary scorer, after cutting the completion at the protocol's stop
strings (a run-on into an invented next question is not scored on that question).

* correctness: 1.0 where the protocol's primary scorer credits the completion.
* format: 1.0 where the completion has the protocol's answer form (`\\boxed{...}`
  for qwen_boxed and qwen25_math_cot, `#### <number>` for finellama, lm-eval's strict-match form for
  lm_eval_gsm8k).
* digits: the fraction of visible characters that are digits (a shaping reward a
  tiny random model can learn in a CPU test).

Every reward follows TRL's calling convention ``f(completions, **dataset_columns)
-> list[float]``, where a completion is a string or a conversation
``[{"role": "assistant", "content": ...}]``.

    funcs = build_reward_funcs(cfg.trainer.rewards, cfg.eval.protocol)

Extraction helpers are re-exported from extraction.py for older imports.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

from finellama_rl.config import EvalProtocol
from finellama_rl.task.extraction import (  # noqa: F401 - re-exported
    Extraction, extract_answer, extract_lenient, extract_strict, is_correct, normalize_number, reference_answer,
)

RewardFunc = Callable[..., list]
REWARD_NAMES = ("correctness", "format", "digits")
LEGACY_PROTOCOL = EvalProtocol.finellama  # callers that build prompts from data.system_prompt


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return _completion_text(completion[-1]) if completion else ""
    raise TypeError(f"completion must be a str or a list of messages, got {type(completion).__name__}")


def boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def has_answer_form(protocol: EvalProtocol, text: str) -> bool:
    """Whether `text` states a final answer the way `protocol` asks for it."""
    from finellama_rl.task import lm_eval
    from finellama_rl.task.protocols import BOXED_PROTOCOLS

    protocol = EvalProtocol(protocol)
    if protocol in BOXED_PROTOCOLS:
        content = boxed_content(text)
        return bool(content and content.strip())
    if protocol == EvalProtocol.lm_eval_gsm8k:
        return lm_eval.extracted_answer(text, flexible=False) is not None
    if protocol == EvalProtocol.finellama:
        return extract_strict(text) is not None
    raise ValueError(f"unknown eval protocol {protocol!r}: expected {'|'.join(p.value for p in EvalProtocol)}")


def make_correctness_reward(protocol: EvalProtocol = LEGACY_PROTOCOL) -> RewardFunc:
    """The correctness reward of `protocol`: its primary scorer on the completion cut at its stops."""
    from finellama_rl.task.protocols import protocol_spec
    from finellama_rl.task.scoring import cut_at_stop, judge

    spec = protocol_spec(protocol)

    def correctness_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
        return [1.0 if judge(spec.primary, cut_at_stop(_completion_text(c), spec.stop_strings)[0], str(a)).correct else 0.0
                for c, a in zip(completions, answer)]

    correctness_reward.__doc__ = f"1.0 where {spec.primary.value} credits the completion ({spec.name.value} protocol)."
    return correctness_reward


def make_format_reward(protocol: EvalProtocol = LEGACY_PROTOCOL) -> RewardFunc:
    """1.0 where the completion (cut at the protocol's stops) has the protocol's answer form."""
    from finellama_rl.task.protocols import protocol_spec
    from finellama_rl.task.scoring import cut_at_stop

    spec = protocol_spec(protocol)

    def format_reward(completions: list, **kwargs: Any) -> list[float]:
        return [1.0 if has_answer_form(spec.name, cut_at_stop(_completion_text(c), spec.stop_strings)[0]) else 0.0
                for c in completions]

    return format_reward


def _digit_fraction(text: str) -> float:
    """Fraction of the non-whitespace characters of ``text`` that are ASCII digits."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    return sum("0" <= ch <= "9" for ch in visible) / len(visible)


def digit_reward(completions: list, **kwargs: Any) -> list[float]:
    """Shaping reward: the fraction of visible characters that are digits.

    Easy enough for a tiny random-init model to learn in a CPU test.
    """
    return [_digit_fraction(_completion_text(c)) for c in completions]


REWARD_FUNCS: Dict[str, Callable[[EvalProtocol], RewardFunc]] = {
    "correctness": make_correctness_reward,
    "format": make_format_reward,
    "digits": lambda protocol: digit_reward,
}


def build_reward_funcs(names: Sequence[str], protocol: EvalProtocol = LEGACY_PROTOCOL) -> list[RewardFunc]:
    """The reward functions for the given names, in order, judged like `protocol`'s evaluation.

    Training passes cfg.eval.protocol; the default (finellama) suits callers that built
    their prompts from data.system_prompt."""
    funcs = []
    for name in names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"unknown reward {name!r}: expected one of {'|'.join(REWARD_FUNCS)}")
        funcs.append(REWARD_FUNCS[name](protocol))
    return funcs
