"""Accuracy of a model on the problems of a split under a named protocol (task/protocols.py):
prompts, generation with explicit decoding and stop strings (eval/generation.py),
scoring under every scorer (task/scoring.py) with the protocol's as primary,
Wilson 95% intervals, per-example records, and the eval document written as
eval_results.json / eval_baseline.json / evals/*.json (schema 2, README.md).

Used inside training runs (baseline, eval_every, final) and by the evaluate command:

    setup = prepare_split_eval(cfg, tokenizer, "test")      # or "validation" (selections)
    result = evaluate_model(model, tokenizer, setup, desc="final")
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from finellama_rl.config import Config, eval_num_examples
from finellama_rl.eval.generation import Completion, Decoding, Generated, eos_token_ids, model_generation_overrides
from finellama_rl.task.protocols import (
    PromptFormat, budget_record, eval_max_new_tokens, eval_shots, prompt_format, prompt_template_text, render_prompt,
    select_shots, stop_strings,
)
from finellama_rl.eval.schema import EVAL_SCHEMA_VERSION, headline
from finellama_rl.eval.statistics import wilson_interval
from finellama_rl.task.data import load_problems, shot_problems, split_record
from finellama_rl.task.extraction import reference_answer
from finellama_rl.task.splits import Split
from finellama_rl.task.scoring import ALL_SCORERS, SCORER_DESCRIPTIONS, Scorer, cut_at_stop, judge_all, scorer_versions

Problem = Dict[str, str]
DEFAULT_BATCH_SIZE = 64  # eval.batch_size 0 (older configs) means this


@dataclass
class EvalSetup:
    """Everything that defines one evaluation, prepared once and reused for every checkpoint."""

    problems: List[Problem]
    prompts: List[str]
    fmt: PromptFormat
    stops: List[str]
    decoding: Decoding
    batch_size: int
    protocol: Dict[str, Any] = field(default_factory=dict)
    split: Optional[Dict[str, Any]] = None  # task/data.py split_record: which split, its size, how it was made


def select_problems(problems: Sequence[Problem], num_examples: str) -> List[Problem]:
    n = eval_num_examples(num_examples)
    return list(problems if n is None else problems[:n])


def model_record(cfg: Config, adapter: Optional[str]) -> Dict[str, Any]:
    """Which weights were evaluated: id, revision, adapter, quantization, compute dtype."""
    m, q = cfg.model, cfg.trainer.quantization
    bf16 = cfg.hardware.bf16 and cfg.hardware.device.value == "cuda"
    return {"name": m.name, "id": m.path or ("tiny (random init, built locally)" if m.tiny else m.hub_id),
            "revision": None if (m.path or m.tiny) else m.revision, "adapter": adapter,
            "quantization": {"method": "bitsandbytes 4-bit", "quant_type": q.quant_type.value,
                             "double_quant": q.double_quant} if q.enabled else None,
            "compute_dtype": "bfloat16" if bf16 else "float32"}


def chat_template_record(tokenizer, fmt: PromptFormat) -> Dict[str, Any]:
    text = getattr(tokenizer, "chat_template", None) if fmt.spec.chat_template else None
    if isinstance(text, dict):  # several named templates
        text = text.get("default") or next(iter(text.values()), None)
    return {"chat_template": bool(fmt.spec.chat_template),
            "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest() if text else None,
            "chat_template_text": text}


def prepare_split_eval(cfg: Config, tokenizer, split: Union[Split, str], adapter: Optional[str] = None) -> EvalSetup:
    """prepare_eval on a named split (task/splits.py): validation for every selection, test
    for what is reported; shots from task/data.py shot_problems; the split is recorded."""
    problems = load_problems(cfg.data, split)
    return prepare_eval(cfg, tokenizer, problems, shot_problems(cfg.data, split), adapter,
                        split_record(cfg.data, split, len(problems)))


def prepare_eval(cfg: Config, tokenizer, test_problems: Sequence[Problem], train_problems: Sequence[Problem],
                 adapter: Optional[str] = None, split: Optional[Dict[str, Any]] = None) -> EvalSetup:
    """Problems, prompts (with the protocol's shots), decoding and the protocol record;
    `split` (task/data.py split_record) says which split `test_problems` are."""
    ev = cfg.eval
    fmt = prompt_format(ev.protocol, cfg.data.system_prompt)
    problems = select_problems(test_problems, ev.num_examples)
    shots = select_shots(fmt, train_problems, len(problems), eval_shots(ev))
    prompts = [render_prompt(tokenizer, fmt, p["question"], s) for p, s in zip(problems, shots)]
    decoding = Decoding(max_new_tokens=eval_max_new_tokens(ev))
    stops = stop_strings(fmt, tokenizer)
    record = {
        "name": fmt.protocol.value, "source": fmt.spec.source, "prompt_template": prompt_template_text(fmt),
        "system_prompt": fmt.system_prompt, "user_template": fmt.spec.user_template,
        **chat_template_record(tokenizer, fmt), "shots": eval_shots(ev),
        "shot_selection": {"first": "the first N training problems", "lm_eval":
                           "lm-eval's: random.Random(1234).sample(train, N) per test problem, in order"}[fmt.spec.shot_selection],
        "stop_strings": stops, "num_examples": ev.num_examples, "num_problems": len(problems),
        "batch_size": ev.batch_size or DEFAULT_BATCH_SIZE, "primary": fmt.spec.primary.value,
        "scorers": dict(SCORER_DESCRIPTIONS), "scorer_versions": scorer_versions(),
        "model": model_record(cfg, adapter),
    }
    return EvalSetup(problems, prompts, fmt, stops, decoding, ev.batch_size or DEFAULT_BATCH_SIZE, record, split)


def score(problems: Sequence[Problem], completions: Sequence[Union[Completion, str]], primary: Scorer,
          stops: Sequence[str] = ()) -> Dict[str, Any]:
    """Accuracy, counts and Wilson intervals under every scorer, plus per-example records.

    Plain strings are cut at `stops` first (generate_completions already cut its own)."""
    names = [s.value for s in ALL_SCORERS]
    correct = {s: 0 for s in names}
    records = []
    for index, (p, comp) in enumerate(zip(problems, completions)):
        if isinstance(comp, str):
            text, stop = cut_at_stop(comp, stops)
            comp = Completion(text, f"stop:{stop}" if stop else "unknown", -1)
        verdicts = judge_all(comp.text, p["answer"])
        for s in names:
            correct[s] += verdicts[s].correct
        records.append({"index": p.get("index", index), "question": p["question"], "reference": reference_answer(p["answer"]),
                        "completion": comp.text, "finish": comp.finish, "new_tokens": comp.new_tokens,
                        "extracted": {s: v.extracted for s, v in verdicts.items()},
                        "correct": {s: v.correct for s, v in verdicts.items()}})
    n = len(records)
    return {
        "primary": Scorer(primary).value,
        "accuracy": {s: correct[s] / n if n else 0.0 for s in names},
        "correct": correct,
        "ci95": {s: list(wilson_interval(correct[s], n)) if n else None for s in names},
        "total": n,
        "records": records,
    }


def generation_record(gen: Generated) -> Dict[str, Any]:
    finishes: Dict[str, int] = {}
    for c in gen.completions:
        key = c.finish if not c.finish.startswith("stop:") else "stop"
        finishes[key] = finishes.get(key, 0) + 1
    return {"batch_size_used": gen.batch_size, "generate_calls": gen.calls, "seconds": round(gen.seconds, 3),
            "problems_per_s": round(gen.problems_per_s, 3), "oom_steps": gen.oom_steps, "finish": finishes}


def evaluate_model(model, tokenizer, setup: EvalSetup, desc: str = "eval") -> Dict[str, Any]:
    """Greedy accuracy of `model` on the setup's problems, with the full protocol record."""
    from finellama_rl.eval.generation import generate_completions

    protocol = {**setup.protocol, "decoding": setup.decoding.record(), "eos_token_ids": eos_token_ids(model, tokenizer),
                "model_generation_config_ignored": model_generation_overrides(model)}
    gen = generate_completions(model, tokenizer, setup.prompts, setup.decoding, setup.stops, setup.batch_size, desc)
    result = score(setup.problems, gen.completions, setup.fmt.spec.primary)
    result["protocol"] = protocol
    result["generation"] = generation_record(gen)
    result["split"] = setup.split
    return result


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The result without per-example records (for baselines and logs)."""
    return {k: v for k, v in result.items() if k != "records"}


def eval_document(cfg: Config, step: int, result: Dict[str, Any], baseline: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    m = cfg.model
    return {
        "schema_version": EVAL_SCHEMA_VERSION,
        "run": cfg.run.name, "sweep": cfg.run.sweep, "run_dir": cfg.run.dir,
        "model": m.name, "model_source": m.path or m.hub_id, "model_revision": None if (m.path or m.tiny) else m.revision,
        "trainer": cfg.trainer.algo.value, "hardware": cfg.hardware.name, "data": cfg.data.source.value,
        "step": step, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "split": result.get("split"),  # {name: train|validation|test, size, split_seed, how}; null: not recorded
        "protocol": result["protocol"], "primary": result["primary"],
        "accuracy": result["accuracy"], "correct": result["correct"], "ci95": result["ci95"], "total": result["total"],
        "generation": result.get("generation"),
        "budgets": budget_record(cfg.trainer, cfg.eval),  # training's and evaluation's budget and shots, side by side
        "pass_at_k": result.get("pass_at_k"),  # eval.samples > 1 (evaluate command, training evaluations)
        "baseline": summary(baseline) if baseline else None,
        "records": result["records"],
    }


def format_accuracy(result: Dict[str, Any]) -> str:
    """One line for logs: protocol/scorer accuracy [95% interval] (c/n), strict and lenient (any schema)."""
    return headline(result)
