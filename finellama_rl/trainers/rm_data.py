"""The labelled data of `trainer=rm`: completions sampled from a policy on training-split
problems, corrupted copies of them, and the references, every one labelled by the
correctness scorer of the run's evaluation protocol (the same function the correctness
reward and evaluation use), split by *problem* into a training and a held-out part.

Why corrupted copies: a policy that is right on most problems gives few negatives, and
negatives that differ from positives in form (no final answer, run-on text) teach a
classifier the form, not correctness. A corrupted copy keeps a completion's form and
changes its final answer to a wrong number everywhere it appears, so only checking the
arithmetic tells it apart. Its label still comes from the scorer, never from us.

Pure apart from `sample_completions` (generation with the policy).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

from finellama_rl.config import Config, EvalProtocol

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Example:
    question: str
    completion: str
    answer: str  # the reference solution
    label: int  # 1: the scorer credits the completion
    origin: str  # "sample" | "corrupted" | "reference"
    problem: int  # index of the problem (the split is by problem)

    def to_json(self) -> Dict[str, object]:
        return asdict(self)


def corrupt(completion: str, rng: random.Random) -> str | None:
    """The completion with its final number replaced by a different one everywhere it
    appears as a whole number; None when it has no number."""
    numbers = NUMBER.findall(completion)
    if not numbers:
        return None
    final = numbers[-1]
    value = float(final)
    delta = rng.choice([d for d in range(-5, 6) if d]) if abs(value) < 20 else rng.choice([-1, 1]) * max(1, round(abs(value) * rng.uniform(0.05, 0.3)))
    wrong = value + delta
    text = str(int(wrong)) if "." not in final else f"{wrong:.{len(final.split('.')[1])}f}"
    return re.sub(rf"(?<![\d.]){re.escape(final)}(?![\d.])", text, completion)


def split_problems(n: int, heldout_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(training, held-out) problem indices: a seeded shuffle, at least one of each."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * heldout_fraction)))
    return sorted(order[k:]), sorted(order[:k])


def label_examples(protocol: EvalProtocol, candidates: Sequence[Tuple[str, str, str, str, int]]) -> List[Example]:
    """Label (question, completion, answer, origin, problem) tuples with the protocol's correctness reward."""
    from finellama_rl.rewards.rules import make_correctness_reward

    reward = make_correctness_reward(protocol)
    labels = reward([c[1] for c in candidates], answer=[c[2] for c in candidates]) if candidates else []
    return [Example(q, c, a, int(y > 0.5), o, p) for (q, c, a, o, p), y in zip(candidates, labels)]


def build_candidates(problems: Sequence[Dict[str, str]], samples: Sequence[Sequence[str]], protocol: EvalProtocol,
                     corrupted_per_problem: int, include_reference: bool, seed: int) -> List[Tuple[str, str, str, str, int]]:
    """Samples, corrupted copies (of random samples, or of the reference) and references, per problem."""
    from finellama_rl.task.protocols import target_text

    rng = random.Random(seed)
    out = []
    for i, (p, outs) in enumerate(zip(problems, samples)):
        reference = target_text(protocol, p["answer"])
        out += [(p["question"], s, p["answer"], "sample", i) for s in outs]
        pool = [s for s in outs if NUMBER.search(s)] or [reference]
        for _ in range(corrupted_per_problem):
            bad = corrupt(rng.choice(pool), rng)
            if bad is not None:
                out.append((p["question"], bad, p["answer"], "corrupted", i))
        if include_reference:
            out.append((p["question"], reference, p["answer"], "reference", i))
    return out


def balance(examples: List[Example], seed: int) -> List[Example]:
    """Drop a seeded random surplus of the larger class."""
    pos = [e for e in examples if e.label]
    neg = [e for e in examples if not e.label]
    if not pos or not neg:
        return list(examples)
    rng = random.Random(seed)
    k = min(len(pos), len(neg))
    kept = rng.sample(pos, k) + rng.sample(neg, k)
    rng.shuffle(kept)
    return kept


def sample_completions(cfg: Config, policy, tokenizer, problems: Sequence[Dict[str, str]]) -> List[List[str]]:
    """trainer.rm.samples_per_problem completions per problem, sampled under the run's protocol prompt."""
    from finellama_rl.task.data import build_prompt
    from finellama_rl.eval.generation import Decoding, generate_completions
    from finellama_rl.task.protocols import prompt_format, stop_strings

    t, r = cfg.trainer, cfg.trainer.rm
    fmt = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)
    prompts = [build_prompt(tokenizer, fmt, p["question"]) for p in problems]
    decoding = Decoding(max_new_tokens=t.max_completion_tokens, do_sample=True, temperature=r.sample_temperature,
                        num_return_sequences=r.samples_per_problem, seed=t.seed)
    batch = max(t.generation_batch or 0, t.micro_batch * r.samples_per_problem)
    gen = generate_completions(policy, tokenizer, prompts, decoding, stop_strings(fmt, tokenizer), batch, desc="rm samples")
    k = r.samples_per_problem
    return [[c.text for c in gen.completions[i * k:(i + 1) * k]] for i in range(len(problems))]


def describe(examples: Sequence[Example]) -> Dict[str, object]:
    """Counts per origin and label (written into rm_eval.json and the log)."""
    out: Dict[str, object] = {"n": len(examples), "positives": sum(e.label for e in examples)}
    for origin in ("sample", "corrupted", "reference"):
        part = [e for e in examples if e.origin == origin]
        out[origin] = {"n": len(part), "positives": sum(e.label for e in part)}
    return out
