"""Problems and prompts: GSM8K (hub id or a local jsonl/parquet file) and a seeded
synthetic task of GSM8K-format word problems that needs no download.

Every problem is a dict {question, answer} where answer is a GSM8K-style solution
ending in `#### <number>`. Prompts are built under the run's evaluation protocol
(eval.protocol; templates in task/protocols.py), so training and evaluation see
exactly the same text.

    from finellama_rl.task.data import load_problems
    train = load_problems(cfg.data, "train")        # never a validation problem
    validation = load_problems(cfg.data, "validation")  # what selections read (task/splits.py)
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from finellama_rl.config import DataConfig, DataSource, PairOrder
from finellama_rl.errors import ConfigError
from finellama_rl.task.splits import PairKey, Split, as_split, carve_validation, pair_key, pair_pools

if TYPE_CHECKING:
    from finellama_rl.task.protocols import PromptFormat

Problem = Dict[str, str]

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "shells"]


OPS = ("add", "sub", "mul", "add_sub")  # the synthetic task's problem kinds (data.ops)


def _one_problem(rng: random.Random, max_operand: int, ops: Sequence[str] = OPS,
                 order: PairOrder = PairOrder.unordered) -> Tuple[Problem, List[PairKey]]:
    """A one- or two-step add/subtract/multiply word problem with its worked solution, and
    the operand pair of each step as written (task/splits.py pair_key under `order`).
    Difficulty knobs: max_operand (digits to copy and carry) and ops (which kinds)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_operand), rng.randint(1, max_operand)
    kind = rng.choice(list(ops))
    if kind == "add":
        q = f"{name} has {a} {item}. {name} finds {b} more {item}. How many {item} does {name} have now?"
        steps, ans, pairs = [f"{a} + {b} = {a + b}"], a + b, [pair_key("+", a, b, order)]
    elif kind == "sub":
        a = a + b  # keep the result non-negative
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps, ans, pairs = [f"{a} - {b} = {a - b}"], a - b, [pair_key("-", a, b)]
    elif kind == "mul":
        b = rng.randint(2, 9)
        q = f"{name} buys {b} boxes with {a} {item} in each box. How many {item} does {name} buy?"
        steps, ans, pairs = [f"{b} * {a} = {a * b}"], a * b, [pair_key("*", b, a, order)]
    elif kind == "add_sub":
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?"
        steps, ans = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
        pairs = [pair_key("+", a, b, order), pair_key("-", a + b, c)]
    else:
        raise ConfigError("data.ops", f"unknown problem kind {kind!r}: expected some of {'|'.join(OPS)}")
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {ans}"}, pairs


def generate_arithmetic(num: int, seed: int, max_operand: int, exclude: Sequence[str] = (), ops: Sequence[str] = OPS,
                        pools: Optional[Dict[PairKey, Split]] = None, split: Optional[Split] = None,
                        order: PairOrder = PairOrder.unordered) -> List[Problem]:
    """`num` distinct problems from a seeded generator, none of whose questions is in
    `exclude`; with `pools` (task/splits.py pair_pools), only problems whose every step
    uses a pair of `split`'s pool, pairs keyed under `order` (without pools: the generator
    as it always was, which the tiny tokenizer's corpus relies on)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 200 * num + 1000:
            raise ConfigError("data.max_operand", f"cannot make {num} distinct {split.value + ' ' if split else ''}problems "
                              f"with max_operand={max_operand}; raise it (or ask for fewer problems)")
        p, pairs = _one_problem(rng, max_operand, ops, order)
        if pools is not None and any(pools[k] != split for k in pairs):
            continue
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def arithmetic_splits(cfg: DataConfig) -> Dict[Split, List[Problem]]:
    """The synthetic task's three splits, each from its own operand pairs (task/splits.py)
    and its own generator seed: train data.num_train, validation data.validation_size,
    test data.num_test problems. Made once per setting in a process (a run asks often)."""
    splits = _arithmetic_splits(cfg.num_train, cfg.validation_size, cfg.num_test, cfg.synthetic_seed, cfg.split_seed,
                                cfg.max_operand, tuple(cfg.ops), cfg.heldout_pair_fraction, PairOrder(cfg.heldout_pairs))
    return {split: [dict(p) for p in problems] for split, problems in splits.items()}  # callers may change them


@functools.lru_cache(maxsize=8)
def _arithmetic_splits(num_train: int, num_validation: int, num_test: int, seed: int, split_seed: int, max_operand: int,
                       ops: Tuple[str, ...], heldout_fraction: float, order: PairOrder) -> Dict[Split, Tuple[Problem, ...]]:
    pools = pair_pools(max_operand, split_seed, heldout_fraction, order)
    sizes = {Split.train: num_train, Split.test: num_test, Split.validation: num_validation}
    offsets = {Split.train: 0, Split.test: 1, Split.validation: 2}
    return {split: tuple(generate_arithmetic(n, seed + offsets[split], max_operand, ops=ops, pools=pools, split=split,
                                             order=order))
            for split, n in sizes.items()}


def _load_file(path: str, key: str) -> List[Problem]:
    from datasets import load_dataset

    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"file not found: {path}; point it at a jsonl or parquet file with question and answer columns")
    kind = "parquet" if p.suffix == ".parquet" else "json"
    ds = load_dataset(kind, data_files=str(p), split="train")
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ConfigError(key, f"{path} lacks column(s) {sorted(missing)}; it has {ds.column_names}")
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


def _load_gsm8k(cfg: DataConfig, split: Split) -> List[Problem]:
    """The source's own split: train (data.path or data.train_split, before carving) or test."""
    if cfg.path:
        if split == Split.train:
            return _load_file(cfg.path, "data.path")
        if cfg.test_path:
            return _load_file(cfg.test_path, "data.test_path")
        raise ConfigError("data.test_path", "evaluation needs a test file next to data.path; set data.test_path=<file>")
    from datasets import load_dataset

    name = cfg.train_split if split == Split.train else cfg.test_split
    ds = load_dataset(cfg.hub_id, cfg.hub_config, split=name)
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


def load_problems(cfg: DataConfig, split: Union[Split, str]) -> List[Problem]:
    """Problems of `split` (train | validation | test, task/splits.py) for the configured
    source. train never holds a validation problem; data.max_train_examples cuts train."""
    split = as_split(split)
    if cfg.source == DataSource.arithmetic:
        problems = arithmetic_splits(cfg)[split]
    elif cfg.source == DataSource.gsm8k:
        if split == Split.test:
            problems = _load_gsm8k(cfg, Split.test)
        else:
            train, validation = carve_validation(_load_gsm8k(cfg, Split.train), cfg.validation_size, cfg.split_seed)
            problems = train if split == Split.train else validation
    else:
        raise ValueError(f"unknown data source {cfg.source!r}: expected gsm8k|arithmetic")
    if split == Split.train and cfg.max_train_examples:
        problems = problems[: cfg.max_train_examples]
    return problems


def shot_problems(cfg: DataConfig, split: Union[Split, str]) -> List[Problem]:
    """Where few-shot examples of an evaluation on `split` come from: for test, the
    source's whole training split (what lm-evaluation-harness draws from: its shots stay
    byte-identical); for validation, the training split without the validation problems
    (a validation problem must never be its own shot)."""
    split = as_split(split)
    if split == Split.test and cfg.source == DataSource.gsm8k:
        return _load_gsm8k(cfg, Split.train)
    return load_problems(cfg, Split.train)


def split_record(cfg: DataConfig, split: Union[Split, str], size: int) -> Dict[str, object]:
    """What an eval file records of the split it evaluated (README "Eval files")."""
    split = as_split(split)
    if cfg.source == DataSource.arithmetic:
        order = PairOrder(cfg.heldout_pairs)
        never = (f"never in a training solution {'in either order' if order == PairOrder.unordered else 'in this order'} "
                 f"(data.heldout_pairs={order.value})")
        how = {Split.test: f"test operand pairs (data.heldout_pair_fraction), {never}",
               Split.validation: f"validation operand pairs (data.heldout_pair_fraction), {never}",
               Split.train: "training operand pairs"}[split]
    else:
        how = {Split.test: f"the source's test split ({cfg.test_path or cfg.test_split})",
               Split.validation: f"{cfg.validation_size} problems drawn from the training split by random.Random(data.split_seed)",
               Split.train: "the training split without the validation problems"}[split]
    return {"name": split.value, "size": size, "split_seed": cfg.split_seed, "how": how}


def as_prompt_format(fmt: Union["PromptFormat", str]) -> "PromptFormat":
    """A PromptFormat; a plain string is taken as the finellama protocol's system prompt (older callers)."""
    from finellama_rl.config import EvalProtocol
    from finellama_rl.task.protocols import prompt_format

    return prompt_format(EvalProtocol.finellama, fmt) if isinstance(fmt, str) else fmt


def build_prompt(tokenizer, fmt: Union["PromptFormat", str], question: str, shots: Sequence[Problem] = ()) -> str:
    """The exact prompt text of a question under a protocol (task/protocols.py render_prompt):
    chat template with the generation prompt for qwen_boxed/finellama, plain text for lm_eval_gsm8k."""
    from finellama_rl.task.protocols import render_prompt

    return render_prompt(tokenizer, as_prompt_format(fmt), question, shots)


def with_prompts(
    problems: Sequence[Problem], tokenizer, fmt: Union["PromptFormat", str], max_prompt_tokens: Optional[int] = None,
    shots: Sequence[Problem] = (),
) -> Tuple[List[Dict[str, str]], int]:
    """Rows {prompt, question, answer} under a protocol (`prompt_format(cfg.eval.protocol,
    cfg.data.system_prompt)`; a plain string is the finellama system prompt); drops prompts
    longer than max_prompt_tokens, measured in one batched tokenizer call.

    Returns (rows, number dropped). Dropping rather than truncating keeps every
    prompt a whole question.
    """
    fmt = as_prompt_format(fmt)
    prompts = [build_prompt(tokenizer, fmt, p["question"], shots) for p in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if max_prompt_tokens and prompts else None
    rows, dropped = [], 0
    for i, (p, prompt) in enumerate(zip(problems, prompts)):
        if lengths is not None and lengths[i] > max_prompt_tokens:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "question": p["question"], "answer": p["answer"]})
    return rows, dropped
