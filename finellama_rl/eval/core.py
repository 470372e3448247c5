"""Accuracy of a model on test problems: prompts, greedy generation, scoring under
strict (`#### n`) and lenient (last number) extraction, per-example records, and
the eval document written as eval_results.json (schema in README.md).

Used inside training runs (baseline, eval_every, final) and by the evaluate command.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, List, Optional, Sequence

from finellama_rl.config import Config, DataConfig, EvalConfig, eval_num_examples
from finellama_rl.data import Problem, build_prompt
from finellama_rl.eval.generation import generate
from finellama_rl.results import SCHEMA_VERSION
from finellama_rl.rewards.rules import extract_lenient, extract_strict, is_correct, reference_answer


def select_problems(problems: Sequence[Problem], num_examples: str) -> List[Problem]:
    n = eval_num_examples(num_examples)
    return list(problems if n is None else problems[:n])


def score(problems: Sequence[Problem], completions: Sequence[str]) -> Dict[str, Any]:
    """Accuracy under both extraction rules plus per-example records."""
    records, strict_ok, lenient_ok = [], 0, 0
    for p, completion in zip(problems, completions):
        ref = reference_answer(p["answer"])
        strict, lenient = extract_strict(completion), extract_lenient(completion)
        ok_s, ok_l = is_correct(strict, ref), is_correct(lenient, ref)
        strict_ok += ok_s
        lenient_ok += ok_l
        records.append({"question": p["question"], "reference": ref, "completion": completion,
                        "extracted_strict": strict, "extracted_lenient": lenient,
                        "correct_strict": ok_s, "correct_lenient": ok_l})
    n = len(records)
    return {
        "accuracy": {"strict": strict_ok / n if n else 0.0, "lenient": lenient_ok / n if n else 0.0},
        "correct": {"strict": strict_ok, "lenient": lenient_ok},
        "total": n,
        "records": records,
    }


def protocol(data: DataConfig, ev: EvalConfig, shots: Sequence[Problem]) -> Dict[str, Any]:
    return {
        "system_prompt": data.system_prompt,
        "prompt_template": "chat template: system, [shots as user/assistant turns], user question, assistant",
        "shots": len(shots),
        "num_examples": ev.num_examples,
        "max_new_tokens": ev.max_new_tokens,
        "temperature": 0.0,
        "decoding": "greedy",
        "extraction": {"strict": "number after the last '####'", "lenient": "last number in the completion"},
        "primary": "strict",
    }


def evaluate_model(model, tokenizer, problems: Sequence[Problem], data: DataConfig, ev: EvalConfig,
                   batch_size: int, shots: Sequence[Problem] = (), desc: str = "eval") -> Dict[str, Any]:
    chosen = select_problems(problems, ev.num_examples)
    prompts = [build_prompt(tokenizer, data.system_prompt, p["question"], shots) for p in chosen]
    completions = generate(model, tokenizer, prompts, ev.max_new_tokens, batch_size, desc)
    result = score(chosen, completions)
    result["protocol"] = protocol(data, ev, shots)
    return result


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The result without per-example records (for baselines and logs)."""
    return {k: v for k, v in result.items() if k != "records"}


def eval_document(cfg: Config, step: int, result: Dict[str, Any], baseline: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run": cfg.run.name,
        "sweep": cfg.run.sweep,
        "run_dir": cfg.run.dir,
        "model": cfg.model.name,
        "model_source": cfg.model.path or cfg.model.hub_id,
        "trainer": cfg.trainer.algo.value,
        "hardware": cfg.hardware.name,
        "data": cfg.data.source.value,
        "step": step,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "accuracy": result["accuracy"],
        "correct": result["correct"],
        "total": result["total"],
        "protocol": result["protocol"],
        "baseline": summary(baseline) if baseline else None,
        "records": result["records"],
    }


def format_accuracy(result: Dict[str, Any]) -> str:
    a, c, n = result["accuracy"], result["correct"], result["total"]
    return f"strict {a['strict']:.1%} ({c['strict']}/{n}), lenient {a['lenient']:.1%} ({c['lenient']}/{n})"
