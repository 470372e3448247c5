"""Problems and prompts: GSM8K (hub id or a local jsonl/parquet file) and a seeded
synthetic task of GSM8K-format word problems that needs no download.

Every problem is a dict {question, answer} where answer is a GSM8K-style solution
ending in `#### <number>`. Prompts are built under the run's evaluation protocol
(eval.protocol; templates in task/protocols.py), so training and evaluation see
exactly the same text.

    from finellama_rl.task.data import load_problems
    train = load_problems(cfg.data, "train")
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from finellama_rl.config import DataConfig, DataSource
from finellama_rl.errors import ConfigError

if TYPE_CHECKING:
    from finellama_rl.task.protocols import PromptFormat

Problem = Dict[str, str]

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "shells"]


OPS = ("add", "sub", "mul", "add_sub")  # the synthetic task's problem kinds (data.ops)


def _one_problem(rng: random.Random, max_operand: int, ops: Sequence[str] = OPS) -> Problem:
    """A one- or two-step add/subtract/multiply word problem with its worked solution.
    Difficulty knobs: max_operand (digits to copy and carry) and ops (which kinds)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_operand), rng.randint(1, max_operand)
    kind = rng.choice(list(ops))
    if kind == "add":
        q = f"{name} has {a} {item}. {name} finds {b} more {item}. How many {item} does {name} have now?"
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    elif kind == "sub":
        a = a + b  # keep the result non-negative
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps, ans = [f"{a} - {b} = {a - b}"], a - b
    elif kind == "mul":
        b = rng.randint(2, 9)
        q = f"{name} buys {b} boxes with {a} {item} in each box. How many {item} does {name} buy?"
        steps, ans = [f"{b} * {a} = {a * b}"], a * b
    elif kind == "add_sub":
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?"
        steps, ans = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    else:
        raise ConfigError("data.ops", f"unknown problem kind {kind!r}: expected some of {'|'.join(OPS)}")
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {ans}"}


def generate_arithmetic(num: int, seed: int, max_operand: int, exclude: Sequence[str] = (), ops: Sequence[str] = OPS) -> List[Problem]:
    """`num` distinct problems from a seeded generator, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 50 * num + 1000:
            raise ConfigError("data.max_operand", f"cannot make {num} distinct problems with max_operand={max_operand}; raise it")
        p = _one_problem(rng, max_operand, ops)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def arithmetic_splits(cfg: DataConfig) -> Tuple[List[Problem], List[Problem]]:
    train = generate_arithmetic(cfg.num_train, cfg.synthetic_seed, cfg.max_operand, ops=cfg.ops)
    test = generate_arithmetic(cfg.num_test, cfg.synthetic_seed + 1, cfg.max_operand, [p["question"] for p in train], cfg.ops)
    return train, test


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


def _load_gsm8k(cfg: DataConfig, split: str) -> List[Problem]:
    if cfg.path:
        if split == "train":
            return _load_file(cfg.path, "data.path")
        if cfg.test_path:
            return _load_file(cfg.test_path, "data.test_path")
        raise ConfigError("data.test_path", "evaluation needs a test file next to data.path; set data.test_path=<file>")
    from datasets import load_dataset

    name = cfg.train_split if split == "train" else cfg.test_split
    ds = load_dataset(cfg.hub_id, cfg.hub_config, split=name)
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


def load_problems(cfg: DataConfig, split: str) -> List[Problem]:
    """Problems of `split` ("train" or "test") for the configured source."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: expected train|test")
    if cfg.source == DataSource.arithmetic:
        train, test = arithmetic_splits(cfg)
        problems = train if split == "train" else test
    elif cfg.source == DataSource.gsm8k:
        problems = _load_gsm8k(cfg, split)
    else:
        raise ValueError(f"unknown data source {cfg.source!r}: expected gsm8k|arithmetic")
    if split == "train" and cfg.max_train_examples:
        problems = problems[: cfg.max_train_examples]
    return problems


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
