"""Evaluate saved checkpoints of a run folder with the run's own config: greedy
accuracy (finellama_rl/eval/core.py) and optionally pass@k from sampled
completions (finellama_rl/eval/passk.py).

    python -m finellama_rl.evaluate run=results/<sweep>/<run> [checkpoint=latest|all|base|<step>]
        [eval.num_examples=all|N] [eval.samples=k] [eval.sample_temperature=0.7]
        [eval.shots=N] [eval.batch_size=N] [eval.max_new_tokens=N] [run.results_dir=DIR]

Each evaluated checkpoint gets `<run>/evals/<checkpoint>-n<N>-<greedy|kK>.json`
(never overwriting: `-2`, `-3`, ...) and an entry in the results index
`<run.results_dir>/eval_results.json` (finellama_rl/index.py). Bad input exits 2
with one line, before any model is loaded.
"""
from __future__ import annotations

import difflib
import itertools
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import Config, ConfigError, EvalConfig, eval_num_examples
from finellama_rl.data import Problem, build_prompt
from finellama_rl.eval.core import eval_document, evaluate_model, format_accuracy, select_problems
from finellama_rl.validation import validate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ command line

CLI_KEYS = ("run", "checkpoint")
OVERRIDE_KEYS = ("eval.num_examples", "eval.samples", "eval.sample_temperature", "eval.shots",
                 "eval.batch_size", "eval.max_new_tokens", "run.results_dir")
USAGE = ("usage: python -m finellama_rl.evaluate run=<run folder> [checkpoint=latest|all|base|<step>] "
         "[eval.num_examples=all|N] [eval.samples=k] [eval.sample_temperature=T] [eval.shots=N] [eval.batch_size=N]")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: the base (adapter_dir None) or a saved checkpoint."""

    label: str  # "base" or "step_000200"
    step: int
    adapter_dir: Optional[Path]


def parse_cli(argv: Sequence[str]) -> Tuple[Path, str, List[str]]:
    """(run folder, checkpoint choice, config overrides) from key=value arguments."""
    from finellama_rl.compose import UsageError

    values: Dict[str, str] = {}
    overrides: List[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {arg!r}; {USAGE}")
        valid = CLI_KEYS + OVERRIDE_KEYS
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(key, f"not a setting of finellama_rl.evaluate.{hint} Valid: {', '.join(valid)}")
        if key in CLI_KEYS:
            values[key] = value
        else:
            overrides.append(arg)
    if not values.get("run"):
        raise ConfigError("run", f"required: the run folder to evaluate, e.g. run=results/<sweep>/<run>; {USAGE}")
    return Path(values["run"]), values.get("checkpoint", "latest") or "latest", overrides


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The run's own resolved config.yaml, typed, with `overrides` applied and validated."""
    from omegaconf import OmegaConf

    from finellama_rl.compose import explain_hydra_error

    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError("run", f"{run_dir} is not a folder; pass run=<results/<sweep>/<run>>")
    if not path.is_file():
        raise ConfigError("run", f"{path} not found; pass a run folder written by finellama_rl.train (it has config.yaml)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    except Exception as exc:  # yaml or omegaconf errors: the file, not the user's overrides
        raise ConfigError("run", f"{path} does not fit the current schema: {str(exc).splitlines()[0]}") from None
    try:
        cfg: Config = OmegaConf.to_object(OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides))))
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("omegaconf", "yaml"):
            raise
        raise explain_hydra_error(exc) from None
    cfg = replace(cfg, run=replace(cfg.run, dir=str(Path(run_dir).resolve())))
    validate(cfg)
    return cfg


def choose_targets(run_dir: Path, choice: str) -> List[Target]:
    """`base`, `latest`, `all` (every saved checkpoint) or one step number."""
    from finellama_rl.checkpoint import list_checkpoints

    if choice == "base":
        return [Target("base", 0, None)]
    ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
    steps = {int(c.name[len("step_"):]): c for c in ckpts}
    if not ckpts:
        raise ConfigError("checkpoint", f"no saved checkpoints in {Path(run_dir) / 'checkpoints'}; use checkpoint=base")
    if choice == "latest":
        chosen = ckpts[-1:]
    elif choice == "all":
        chosen = ckpts
    else:
        try:
            step = int(choice.removeprefix("step_"))
        except ValueError:
            raise ConfigError("checkpoint", f"expected latest|all|base|<step>, got {choice!r}") from None
        if step not in steps:
            raise ConfigError("checkpoint", f"no step {step} in {run_dir}; saved steps: {', '.join(map(str, steps))} (or latest|all|base)")
        chosen = [steps[step]]
    for c in chosen:
        if not (c / "adapter_model.safetensors").is_file():
            raise ConfigError("checkpoint", f"{c} has no adapter_model.safetensors (not a LoRA checkpoint); use checkpoint=base")
    return [Target(c.name, int(c.name[len("step_"):]), c) for c in chosen]


def eval_batch_size(cfg: Config, run_dir: Path) -> Tuple[int, str]:
    """(sequences per generate call, where it came from): eval.batch_size, else the
    micro batch the run ended on (attempts.jsonl), else trainer.micro_batch."""
    from finellama_rl.report import last_ok_micro_batch
    from finellama_rl.results import RunPaths, read_jsonl

    if cfg.eval.batch_size:
        return cfg.eval.batch_size, "eval.batch_size"
    micro = last_ok_micro_batch(read_jsonl(RunPaths(Path(run_dir)).attempts))
    if micro:
        return micro, "attempts.jsonl"
    return cfg.trainer.micro_batch, "trainer.micro_batch"


def eval_file_name(label: str, ev: EvalConfig) -> str:
    n = eval_num_examples(ev.num_examples)
    mode = "greedy" if ev.samples == 1 else f"k{ev.samples}"
    shots = f"-{ev.shots}shot" if ev.shots else ""
    return f"{label}-n{'all' if n is None else n}-{mode}{shots}.json"


def reserve_path(folder: Path, name: str) -> Path:
    """A new file `name` in `folder` (or name-2, name-3, ...), created exclusively so
    that two concurrent evaluations never pick the same file."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = name[: -len(".json")], ".json"
    for i in itertools.count(1):
        path = folder / (f"{stem}{suffix}" if i == 1 else f"{stem}-{i}{suffix}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def load_for_eval(cfg: Config, target: Target):
    from finellama_rl.model import load_base, load_policy

    trainer = replace(cfg.trainer, activation_checkpointing=False)  # generation wants the KV cache
    if target.adapter_dir is None:
        return load_base(cfg.model, trainer, cfg.hardware)
    return load_policy(cfg.model, trainer, cfg.hardware, adapter_dir=str(target.adapter_dir))


def run_target(cfg: Config, target: Target, tokenizer, problems: Sequence[Problem], shots: Sequence[Problem], batch: int) -> Dict[str, Any]:
    """Greedy accuracy (and pass@k when eval.samples > 1) of one checkpoint."""
    import gc

    import torch
    import transformers

    from finellama_rl.eval.passk import add_pass_at_k, sample_completions, score_samples

    ev = cfg.eval
    transformers.set_seed(cfg.trainer.seed)
    model = load_for_eval(cfg, target)
    result = evaluate_model(model, tokenizer, problems, cfg.data, ev, batch, shots, desc=f"{target.label} greedy")
    if ev.samples > 1:
        chosen = select_problems(problems, ev.num_examples)
        prompts = [build_prompt(tokenizer, cfg.data.system_prompt, p["question"], shots) for p in chosen]
        texts = sample_completions(model, tokenizer, prompts, ev.samples, ev.max_new_tokens, ev.sample_temperature,
                                   batch, cfg.trainer.seed, desc=f"{target.label} k={ev.samples}")
        add_pass_at_k(result, score_samples(chosen, texts, ev.sample_temperature, cfg.trainer.seed))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["protocol"]["batch_size"] = batch
    return result


def cli_document(cfg: Config, target: Target, result: Dict[str, Any]) -> Dict[str, Any]:
    """eval_document plus what the command knows: checkpoint label, adapter, pass@k."""
    doc = eval_document(cfg, target.step, result, None)
    records = doc.pop("records")
    doc["checkpoint"] = target.label
    doc["adapter_dir"] = str(target.adapter_dir) if target.adapter_dir else None
    doc["pass_at_k"] = result.get("pass_at_k")
    doc["records"] = records
    return doc


def main(argv: Sequence[str]) -> int:
    """Every check (arguments, config, checkpoints, data) runs before a model loads."""
    from finellama_rl.data import load_problems
    from finellama_rl.index import add_eval_file, results_root
    from finellama_rl.model import load_tokenizer
    from finellama_rl.eval.passk import format_pass_at_k
    from finellama_rl.results import atomic_write_json
    from finellama_rl.console import setup_logging

    run_dir, choice, overrides = parse_cli(argv)
    cfg = load_run_config(run_dir, overrides)
    targets = choose_targets(run_dir, choice)
    batch, batch_from = eval_batch_size(cfg, run_dir)
    problems = select_problems(load_problems(cfg.data, "test"), cfg.eval.num_examples)
    shots = load_problems(cfg.data, "train")[: cfg.eval.shots] if cfg.eval.shots else []
    setup_logging()
    log.info("evaluating %s of %s on %d problems, batch %d (from %s)", ", ".join(t.label for t in targets),
             run_dir, len(problems), batch, batch_from)
    tokenizer = load_tokenizer(cfg.model)
    for target in targets:
        result = run_target(cfg, target, tokenizer, problems, shots, batch)
        path = reserve_path(Path(cfg.run.dir) / "evals", eval_file_name(target.label, cfg.eval))
        atomic_write_json(path, cli_document(cfg, target, result))
        add_eval_file(results_root(cfg.run), path)
        extra = f"; {format_pass_at_k(result['pass_at_k'])}" if result.get("pass_at_k") else ""
        print(f"{target.label}: {format_accuracy(result)}{extra} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
