"""Problems and prompts: GSM8K (hub id or a local jsonl/parquet file) and a seeded
synthetic task of GSM8K-format word problems that needs no download.

Every problem is a dict {question, answer} where answer is a GSM8K-style solution
ending in `#### <number>`. Prompts are built here once, with the tokenizer's chat
template, so training and evaluation see exactly the same text.

    from finellama_rl.data import load_problems
    train = load_problems(cfg.data, "train")
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import ConfigError, DataConfig, DataSource

Problem = Dict[str, str]

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "shells"]


def _one_problem(rng: random.Random, max_operand: int) -> Problem:
    """A one- or two-step add/subtract/multiply word problem with its worked solution."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_operand), rng.randint(1, max_operand)
    kind = rng.choice(["add", "sub", "mul", "add_sub"])
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
    else:
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?"
        steps, ans = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {ans}"}


def generate_arithmetic(num: int, seed: int, max_operand: int, exclude: Sequence[str] = ()) -> List[Problem]:
    """`num` distinct problems from a seeded generator, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 50 * num + 1000:
            raise ConfigError("data.max_operand", f"cannot make {num} distinct problems with max_operand={max_operand}; raise it")
        p = _one_problem(rng, max_operand)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def arithmetic_splits(cfg: DataConfig) -> Tuple[List[Problem], List[Problem]]:
    train = generate_arithmetic(cfg.num_train, cfg.synthetic_seed, cfg.max_operand)
    test = generate_arithmetic(cfg.num_test, cfg.synthetic_seed + 1, cfg.max_operand, [p["question"] for p in train])
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


def build_messages(system_prompt: str, question: str, shots: Sequence[Problem] = ()) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}]
    for shot in shots:
        msgs += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
    return msgs + [{"role": "user", "content": question}]


def build_prompt(tokenizer, system_prompt: str, question: str, shots: Sequence[Problem] = ()) -> str:
    """The exact prompt text (chat template applied, generation prompt added)."""
    msgs = build_messages(system_prompt, question, shots)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def with_prompts(
    problems: Sequence[Problem], tokenizer, system_prompt: str, max_prompt_tokens: Optional[int] = None, shots: Sequence[Problem] = ()
) -> Tuple[List[Dict[str, str]], int]:
    """Rows {prompt, question, answer}; drops prompts longer than max_prompt_tokens.

    Returns (rows, number dropped). Dropping rather than truncating keeps every
    prompt a whole question.
    """
    rows, dropped = [], 0
    for p in problems:
        prompt = build_prompt(tokenizer, system_prompt, p["question"], shots)
        if max_prompt_tokens and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "question": p["question"], "answer": p["answer"]})
    return rows, dropped
