"""Synthetic task, local GSM8K-format files, prompts."""
from __future__ import annotations

import json

import pytest

from finellama_rl.compose import load_config
from finellama_rl.errors import ConfigError
from finellama_rl.config import EvalProtocol
from finellama_rl.task.data import arithmetic_splits, generate_arithmetic, load_problems
from finellama_rl.task.splits import Split
from finellama_rl.task.protocols import build_messages, prompt_format
from finellama_rl.rewards.rules import reference_answer


def test_arithmetic_is_seeded_and_disjoint():
    """(The operand pairs kept apart: tests/test_splits.py.)"""
    cfg = load_config(["data=arithmetic", "data.num_train=300", "data.num_test=50", "data.validation_size=40"]).data
    splits = arithmetic_splits(cfg)
    train, val, test = splits[Split.train], splits[Split.validation], splits[Split.test]
    assert (len(train), len(val), len(test)) == (300, 40, 50)
    assert splits == arithmetic_splits(cfg)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert generate_arithmetic(5, seed=1, max_operand=20) != generate_arithmetic(5, seed=2, max_operand=20)


def test_the_generator_without_pools_is_unchanged():
    """The tiny tokenizer's corpus (job/model.py) is generate_arithmetic without pools: its
    problems must stay exactly those of before the splits existed."""
    first = generate_arithmetic(3, seed=7, max_operand=99)
    assert [p["answer"] for p in first] == ["52 + 84 = 136\n#### 136", "48 + 75 = 123\n#### 123",
                                          "6 + 12 = 18\n18 - 14 = 4\n#### 4"]


def test_arithmetic_answers_are_right():
    for p in generate_arithmetic(200, seed=3, max_operand=30):
        *steps, final = p["answer"].splitlines()
        for step in steps:  # each worked step is true arithmetic: "a op b = c"
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs), step  # noqa: S307 - generated digits and operators only
        assert final.startswith("#### ") and reference_answer(p["answer"]) == steps[-1].split(" = ")[1]


def test_local_jsonl_and_errors(tmp_path):
    rows = [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, {"question": "3*3?", "answer": "#### 9"}]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(["data=gsm8k", f"data.path={train}", f"data.test_path={train}", "data.validation_size=1"]).data
    assert load_problems(cfg, "train") + load_problems(cfg, "validation") in (rows, rows[::-1])
    assert load_problems(cfg, "test") == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "answer": "#### 1"}))
    with pytest.raises(ConfigError, match="lacks column"):
        load_problems(load_config(["data=gsm8k", f"data.path={bad}"]).data, "train")
    with pytest.raises(ConfigError, match="file not found"):
        load_problems(load_config(["data=gsm8k", f"data.path={tmp_path / 'nope.jsonl'}"]).data, "train")


def test_messages_with_shots():
    shots = [{"question": "q1", "answer": "#### 1"}]
    msgs = build_messages(prompt_format(EvalProtocol.finellama, "sys"), "q2", shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "q2" and msgs[0]["content"] == "sys" and msgs[2]["content"] == "#### 1"
    qwen = build_messages(prompt_format(EvalProtocol.qwen_boxed, "sys"), "q2", shots)
    assert qwen[0]["content"] == "You are a helpful assistant." and qwen[-1]["content"].startswith("q2\nPlease reason step by step")
    assert qwen[2]["content"] == "The final answer is $\\boxed{1}$."
