"""The three splits every run uses: train (what training sees), validation (what every
selection reads: evaluations during training, SFT keep-best, recipe choices) and test
(only reported: the baseline and final evaluations). Pure and deterministic.

- GSM8K (or a local file): the validation split is `data.validation_size` problems drawn
  from the training split by random.Random(data.split_seed) (`carve_validation`); the
  rest, in file order, is the training split. The test split is untouched.
- The synthetic task: the operand pairs of every arithmetic step are partitioned into
  train / validation / test pools (`pair_pools`); a problem belongs to a split only when
  every step of its solution uses a pair of that split's pool. So no test solution step
  ("3 + 5 = 8") occurs in any training solution; with data.heldout_pairs=unordered (the
  default) "5 + 3" is the same pair, so neither order is trained; with ordered the two
  orders are two pairs, drawn apart.

    from finellama_rl.task.splits import Split, carve_validation, pair_pools
    train, validation = carve_validation(problems, 500, seed=2026)
"""
from __future__ import annotations

import random
from enum import Enum
from typing import Dict, List, Sequence, Tuple, TypeVar

from finellama_rl.config import PairOrder
from finellama_rl.errors import ConfigError

T = TypeVar("T")
PairKey = Tuple[str, int, int]  # ("+", 3, 5): an operator and its operands (sorted when it commutes, unless ordered)
COMMUTATIVE = ("+", "*")


class Split(str, Enum):
    train = "train"  # what training (SFT, RL, reward models) sees
    validation = "validation"  # every selection: eval_every, keep-best, recipe choices
    test = "test"  # reported only: baseline and final evaluations


def as_split(split) -> Split:
    """A Split from its name; ValueError naming the choices otherwise."""
    try:
        return Split(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}: expected train|validation|test") from None


def carve_validation(problems: Sequence[T], size: int, seed: int) -> Tuple[List[T], List[T]]:
    """(training, validation): `size` problems drawn by random.Random(seed), both parts in
    their original order. ConfigError when nothing would be left to train on."""
    if size < 1 or size >= len(problems):
        raise ConfigError("data.validation_size", f"{size} of {len(problems)} training problems: choose 1.."
                          f"{max(1, len(problems) - 1)} so that both validation and training keep problems")
    chosen = set(random.Random(seed).sample(range(len(problems)), size))
    return ([p for i, p in enumerate(problems) if i not in chosen], [p for i, p in enumerate(problems) if i in chosen])


def pair_key(op: str, x: int, y: int, order: PairOrder = PairOrder.unordered) -> PairKey:
    """The pair of a step written `x op y`: operands sorted when op commutes, unless ordered."""
    return (op, min(x, y), max(x, y)) if op in COMMUTATIVE and order == PairOrder.unordered else (op, x, y)


def pair_space(max_operand: int, order: PairOrder = PairOrder.unordered) -> Dict[str, List[PairKey]]:
    """Every operand pair a synthetic step can use with operands up to max_operand
    (task/data.py _one_problem): sums a + b of a in 2..M and b in 1..M, differences x - y
    of x up to 2M (add_sub subtracts from a sum), products b * a of b in 2..9, a in 2..M."""
    m = max_operand
    return {
        "+": sorted({pair_key("+", a, b, order) for a in range(2, m + 1) for b in range(1, m + 1)}),
        "-": [("-", x, y) for x in range(2, 2 * m + 1) for y in range(1, x + 1)],
        "*": sorted({pair_key("*", b, a, order) for a in range(2, m + 1) for b in range(2, 10)}),
    }


def pair_pools(max_operand: int, seed: int, heldout_fraction: float,
               order: PairOrder = PairOrder.unordered) -> Dict[PairKey, Split]:
    """Each operand pair's split: per operator, the pairs shuffled by random.Random(seed),
    round(fraction x count) (at least 1) to test, as many to validation, the rest to train."""
    if not 0 < heldout_fraction < 0.5:
        raise ConfigError("data.heldout_pair_fraction", f"must be in (0, 0.5) (test and validation each get this share "
                          f"of the operand pairs, training the rest), got {heldout_fraction}")
    pools: Dict[PairKey, Split] = {}
    for op, keys in pair_space(max_operand, order).items():
        keys = list(keys)
        random.Random(f"{seed}/{op}").shuffle(keys)
        held = max(1, round(heldout_fraction * len(keys)))
        if 2 * held >= len(keys):
            raise ConfigError("data.max_operand", f"{len(keys)} '{op}' pairs with max_operand={max_operand} are too few "
                              f"to hold out {held} for test and {held} for validation; raise it")
        for i, key in enumerate(keys):
            pools[key] = Split.test if i < held else Split.validation if i < 2 * held else Split.train
    return pools
