"""The three splits (task/splits.py, task/data.py load_problems): validation carved from
GSM8K's training split, the synthetic task's operand pairs kept apart, both deterministic;
and every evaluation during training reads validation while baseline and final read test."""
from __future__ import annotations

import json
import re

import pytest

from finellama_rl.compose import load_config
from finellama_rl.errors import ConfigError
from finellama_rl.task.data import load_problems, shot_problems, split_record
from finellama_rl.task.splits import carve_validation, pair_pools

STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)$")


def step_pairs(problems) -> set:
    """Every operand pair of every worked step, read from the solution text ("3 + 5 = 8"; a
    sum or product is the same pair either way round)."""
    pairs = set()
    for p in problems:
        for line in p["answer"].splitlines()[:-1]:
            x, op, y, _ = STEP.match(line).groups()
            x, y = int(x), int(y)
            pairs.add((op, min(x, y), max(x, y)) if op in "+*" else (op, x, y))
    return pairs


def questions(problems) -> set:
    return {p["question"] for p in problems}


@pytest.mark.parametrize("ops", ["[add]", "[add,sub,mul,add_sub]"])
def test_no_held_out_step_occurs_in_any_training_solution(ops):
    """Every operand pair of a test or validation solution step (two-step problems too) is
    absent from the training solutions; the three splits share no question."""
    cfg = load_config(["data=arithmetic", f"data.ops={ops}", "data.max_operand=12", "data.num_train=1500",
                       "data.num_test=300", "data.validation_size=300"]).data
    train, val, test = (load_problems(cfg, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (1500, 300, 300)
    train_pairs, val_pairs, test_pairs = step_pairs(train), step_pairs(val), step_pairs(test)
    assert len(test_pairs) >= 10 and len(val_pairs) >= 10  # the check has something to find
    assert not train_pairs & test_pairs and not train_pairs & val_pairs and not val_pairs & test_pairs
    assert not questions(train) & questions(test) and not questions(train) & questions(val)


def test_ordered_pairs_hold_out_each_order_apart():
    """data.heldout_pairs=ordered: a step's pair as written ("5 * 3", "3 + 5") never occurs in
    training, while the reverse of some held-out sums and products does; unordered (the
    default) keeps both orders out."""
    over = ["data=arithmetic", "data.ops=[add,mul,add_sub]", "data.max_operand=12", "data.num_train=1500",
            "data.num_test=300", "data.validation_size=300"]
    cfg = load_config([*over, "data.heldout_pairs=ordered"]).data
    train, test = load_problems(cfg, "train"), load_problems(cfg, "test")
    written = [{(op, int(x), int(y)) for p in ps for x, op, y, _ in (STEP.match(line).groups()
                for line in p["answer"].splitlines()[:-1])} for ps in (train, test)]
    assert len(written[1]) >= 10 and not written[0] & written[1]
    reversed_trained = {(op, x, y) for op, x, y in written[1] if op in "+*" and (op, y, x) in written[0]}
    assert {op for op, _, _ in reversed_trained} == {"+", "*"}
    assert step_pairs(train) & step_pairs(test)  # the same facts, in the other order
    assert not step_pairs(load_problems(load_config(over).data, "train")) & step_pairs(load_problems(load_config(over).data, "test"))
    assert "in this order (data.heldout_pairs=ordered)" in split_record(cfg, "test", 300)["how"]


def test_splits_are_deterministic_and_follow_their_seeds():
    base = ["data=arithmetic", "data.num_train=200", "data.num_test=50", "data.validation_size=50"]
    cfg = load_config(base).data
    first = [load_problems(cfg, s) for s in ("train", "validation", "test")]
    assert first == [load_problems(load_config(base).data, s) for s in ("train", "validation", "test")]
    other = load_config([*base, "data.split_seed=7"]).data
    assert step_pairs(load_problems(other, "test")) != step_pairs(first[2])  # another partition of the pairs
    assert pair_pools(9, 1, 0.2) == pair_pools(9, 1, 0.2) and pair_pools(9, 1, 0.2) != pair_pools(9, 2, 0.2)


def test_too_few_pairs_to_hold_out_is_a_config_error():
    cfg = load_config(["data=arithmetic", "data.max_operand=2", "data.ops=[add]"]).data
    with pytest.raises(ConfigError, match="data.max_operand"):
        load_problems(cfg, "test")


@pytest.fixture
def gsm8k_files(tmp_path):
    train = [{"question": f"q{i}: what is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    test = [{"question": f"t{i}?", "answer": f"#### {i}"} for i in range(7)]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path, train, test


def test_gsm8k_validation_is_carved_from_train_and_the_test_split_is_untouched(gsm8k_files):
    folder, rows, test_rows = gsm8k_files
    over = ["data=gsm8k", f"data.path={folder / 'train.jsonl'}", f"data.test_path={folder / 'test.jsonl'}",
            "data.validation_size=10"]
    cfg = load_config(over).data
    train, val, test = (load_problems(cfg, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val)) == (30, 10) and test == test_rows
    assert not questions(train) & questions(val) and questions(train) | questions(val) == questions(rows)
    assert train == [r for r in rows if r in train] and val == [r for r in rows if r in val]  # file order kept
    assert val == load_problems(load_config(over).data, "validation")  # deterministic
    assert val != load_problems(load_config([*over, "data.split_seed=3"]).data, "validation")
    assert shot_problems(cfg, "test") == rows  # lm-eval's shots come from the whole training split
    assert not questions(shot_problems(cfg, "validation")) & questions(val)  # never its own shot
    with pytest.raises(ConfigError, match="data.validation_size"):
        load_problems(load_config([*over[:-1], "data.validation_size=40"]).data, "train")
    with pytest.raises(ConfigError, match="data.validation_size"):
        load_config([*over[:-1], "data.validation_size=0"])


def test_max_train_examples_cuts_the_training_split_after_carving(gsm8k_files):
    folder, rows, _ = gsm8k_files
    cfg = load_config(["data=gsm8k", f"data.path={folder / 'train.jsonl'}", "data.validation_size=10",
                       "data.max_train_examples=5"]).data
    assert load_problems(cfg, "train") == [r for r in rows if r not in load_problems(cfg, "validation")][:5]


def test_carve_validation_keeps_something_on_both_sides():
    train, val = carve_validation(list(range(5)), 4, seed=0)
    assert len(train) == 1 and len(val) == 4
    for size in (0, 5):
        with pytest.raises(ConfigError):
            carve_validation(list(range(5)), size, seed=0)
