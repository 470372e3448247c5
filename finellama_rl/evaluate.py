"""Evaluate saved checkpoints of a run folder with the run's own config under a
named protocol: greedy accuracy (finellama_rl/eval/core.py) and optionally pass@k
from sampled completions (finellama_rl/eval/passk.py).

    python -m finellama_rl.evaluate run=results/<sweep>/<run> [checkpoint=latest|all|base|<step>]
        [split=test|validation] [eval.protocol=qwen_boxed|qwen25_math_cot|lm_eval_gsm8k|finellama] [eval.num_examples=all|N]
        [eval.samples=k]
        [eval.sample_temperature=0.7] [eval.shots=N] [eval.batch_size=N] [eval.max_new_tokens=N] [run.results_dir=DIR]

`split=validation` evaluates the validation split (task/splits.py): choose a checkpoint
(`checkpoint=all split=validation`) or a recipe there, then report the chosen one on the
test split (the default). Each evaluated checkpoint gets
`<run>/evals/<checkpoint>-<protocol>[-validation]-n<N>-<greedy|kK>.json` (never overwriting: `-2`, `-3`, ...) and an entry in the results index
`<run.results_dir>/eval_results.json` (finellama_rl/index.py). `checkpoint=all` loads
the base once and swaps adapters. A run folder written before protocols existed
(no eval.protocol in its config.yaml) is evaluated under `finellama`, the protocol it
was trained with, unless eval.protocol is given. Bad input exits 2 with one line,
before any model is loaded.
"""
from __future__ import annotations

import difflib
import itertools
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import Config, EvalConfig, EvalProtocol, eval_num_examples
from finellama_rl.errors import ConfigError, RunConfigUnreadable
from finellama_rl.eval.core import EvalSetup, eval_document, evaluate_model, format_accuracy, prepare_split_eval
from finellama_rl.task.splits import Split
from finellama_rl.validation import validate, validate_results_dir
from finellama_rl.results import RunPaths

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ command line

CLI_KEYS = ("run", "checkpoint", "split")
OVERRIDE_KEYS = ("eval.protocol", "eval.num_examples", "eval.samples", "eval.sample_temperature", "eval.shots",
                 "eval.batch_size", "eval.max_new_tokens", "run.results_dir")
USAGE = ("usage: python -m finellama_rl.evaluate run=<run folder> [checkpoint=latest|all|base|<step>] [split=test|validation] "
         "[eval.protocol=qwen_boxed|qwen25_math_cot|lm_eval_gsm8k|finellama] [eval.num_examples=all|N] [eval.samples=k] "
         "[eval.sample_temperature=T] [eval.shots=N] [eval.batch_size=N]")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: the base (adapter_dir None) or a saved checkpoint."""

    label: str  # "base" or "step_000200"
    step: int
    adapter_dir: Optional[Path]


def parse_cli(argv: Sequence[str]) -> Tuple[Path, str, List[str]]:
    """(run folder, checkpoint choice, config overrides) from key=value arguments (the
    split: parse_split)."""
    from finellama_rl.errors import UsageError

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


def parse_split(argv: Sequence[str]) -> Split:
    """`split=test|validation` (default test); ConfigError naming the choices."""
    value = next((a.partition("=")[2] for a in argv if a.partition("=")[0] == "split"), "test") or "test"
    if value not in (Split.test.value, Split.validation.value):
        raise ConfigError("split", f"expected test|validation, got {value!r} (the training split is never evaluated here)")
    return Split(value)


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The run's own resolved config.yaml, typed, with `overrides` applied and validated."""
    from omegaconf import OmegaConf

    from finellama_rl.compose import explain_hydra_error, older_run_settings
    from finellama_rl.fileio import read_run_config_data

    path = RunPaths(Path(run_dir)).config
    if not Path(run_dir).is_dir():
        raise ConfigError("run", f"{run_dir} is not a folder; pass run=<results/<sweep>/<run>>")
    wrong = RunPaths(Path(run_dir)).wrong_kinds(("config", "checkpoints", "evals"))  # what evaluate reads and writes
    if wrong:
        raise ConfigError("run", f"{wrong[0]}; move it out of the way and run again")
    if not path.is_file():
        raise ConfigError("run", f"{path} not found; pass a run folder written by finellama_rl.train (it has config.yaml)")
    try:
        loaded = OmegaConf.create(older_run_settings(read_run_config_data(path)))  # plain data: `${...}` stays text
        if OmegaConf.select(loaded, "eval.protocol", default=None) is None:  # trained before protocols: `####`
            OmegaConf.update(loaded, "eval.protocol", EvalProtocol.finellama.value, force_add=True)
        merged = OmegaConf.merge(OmegaConf.structured(Config), loaded)
        validate(OmegaConf.to_object(merged))  # the file's own values, before the overrides
    except RunConfigUnreadable as exc:
        raise ConfigError("run", str(exc)) from None
    except Exception as exc:  # yaml or omegaconf errors, or impossible values: the file, not the user's overrides
        detail = f"{exc.key}: {exc.message}" if isinstance(exc, ConfigError) else str(exc).splitlines()[0]
        raise ConfigError("run", f"{path} does not fit the current schema: {detail}") from None
    try:
        cfg: Config = OmegaConf.to_object(OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides))))
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("omegaconf", "yaml"):
            raise
        raise explain_hydra_error(exc) from None
    cfg = replace(cfg, run=replace(cfg.run, dir=str(Path(run_dir).resolve())))
    validate(cfg)
    validate_results_dir(cfg.run)  # the index it adds to: never `/`, a home, a system folder
    return cfg


def choose_targets(run_dir: Path, choice: str) -> List[Target]:
    """`base`, `latest`, `all` (every saved checkpoint) or one step number."""
    from finellama_rl.checkpoint import list_checkpoints, verify_checkpoint

    if choice == "base":
        return [Target("base", 0, None)]
    ckpts = list_checkpoints(RunPaths(Path(run_dir)).checkpoints)
    steps = {int(c.name[len("step_"):]): c for c in ckpts}
    if not ckpts:
        raise ConfigError("checkpoint", f"no saved checkpoints in {RunPaths(Path(run_dir)).checkpoints}; use checkpoint=base")
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
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            if not (c / name).exists():
                raise ConfigError("checkpoint", f"{c} has no {name} (not a LoRA checkpoint); use checkpoint=base")
        problem = verify_checkpoint(c)  # the same check, and the same words, as a resumed run's
        if problem:
            others = [str(step) for step, k in steps.items() if k != c]
            raise ConfigError("checkpoint", f"{c} is damaged ({problem}); evaluate another one "
                                            f"(saved steps: {', '.join(others) or 'none'}) or checkpoint=base")
    return [Target(c.name, int(c.name[len("step_"):]), c) for c in chosen]


def eval_file_name(label: str, ev: EvalConfig, split: Split = Split.test) -> str:
    n = eval_num_examples(ev.num_examples)
    mode = "greedy" if ev.samples == 1 else f"k{ev.samples}"
    shots = f"-{ev.shots}shot" if ev.shots is not None else ""  # only when set against the protocol's default
    where = "" if split == Split.test else f"-{split.value}"  # test files keep their names of before
    return f"{label}-{EvalProtocol(ev.protocol).value}{where}-n{'all' if n is None else n}-{mode}{shots}.json"


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


class ModelSlots:
    """The models of a `checkpoint=...` choice, loaded as cheaply as possible: the base once,
    each checkpoint's adapter loaded onto it and the previous one deleted. A run that
    stacks adapters (model.adapter) loads each checkpoint whole instead."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.trainer = replace(cfg.trainer, activation_checkpointing=False)  # generation wants the KV cache
        self.base = None
        self.peft = None
        self.current: Optional[str] = None

    def model_for(self, target: Target):
        from finellama_rl.job.model import load_base, load_policy

        c = self.cfg
        if c.model.adapter and target.adapter_dir is not None:  # stacked adapters: whole load per checkpoint
            self.release()
            self.peft = load_policy(c.model, self.trainer, c.hardware, adapter_dir=str(target.adapter_dir))
            return self.peft
        if self.base is None:
            self.base = load_base(c.model, self.trainer, c.hardware)
        if target.adapter_dir is None:
            if self.peft is not None:
                raise AssertionError("the base is evaluated before any adapter is loaded onto it")
            return self.base
        return self._swap(target)

    def _swap(self, target: Target):
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(target.adapter_dir), adapter_name=target.label)
        else:
            self.peft.load_adapter(str(target.adapter_dir), adapter_name=target.label)
            self.peft.set_adapter(target.label)
            if self.current and self.current != target.label:
                self.peft.delete_adapter(self.current)
        self.current = target.label
        return self.peft

    def release(self) -> None:
        from finellama_rl.job.devices import free_memory

        self.base = self.peft = None
        self.current = None
        free_memory(reset_peak=False)


def run_target(cfg: Config, target: Target, model, tokenizer, setup: EvalSetup) -> Dict[str, Any]:
    """Greedy accuracy (and pass@k when eval.samples > 1) of one checkpoint."""
    import transformers

    from finellama_rl.eval.passk import add_sampled_pass_at_k

    ev = cfg.eval
    transformers.set_seed(cfg.trainer.seed)
    setup = replace(setup, protocol={**setup.protocol, "model": {**setup.protocol["model"],
                                     "adapter": str(target.adapter_dir) if target.adapter_dir else None}})
    result = evaluate_model(model, tokenizer, setup, desc=f"{target.label} greedy")
    if ev.samples > 1:
        add_sampled_pass_at_k(result, model, tokenizer, setup, ev.samples, ev.sample_temperature, cfg.trainer.seed,
                              desc=f"{target.label} k={ev.samples}")
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
    from finellama_rl.console import setup_logging
    from finellama_rl.eval.passk import format_pass_at_k
    from finellama_rl.eval.results_index import add_eval_file, results_root
    from finellama_rl.job.model import load_tokenizer
    from finellama_rl.fileio import atomic_write_json

    run_dir, choice, overrides = parse_cli(argv)
    split = parse_split(argv)
    cfg = load_run_config(run_dir, overrides)
    targets = choose_targets(run_dir, choice)
    setup_logging()
    tokenizer = load_tokenizer(cfg.model)
    setup = prepare_split_eval(cfg, tokenizer, split)
    log.info("evaluating %s of %s under %s on %d %s problems, %d sequences per generate call", ", ".join(t.label for t in targets),
             run_dir, cfg.eval.protocol.value, len(setup.problems), split.value, setup.batch_size)
    slots = ModelSlots(cfg)
    for target in sorted(targets, key=lambda t: t.adapter_dir is not None):  # the base first: adapters wrap it
        result = run_target(cfg, target, slots.model_for(target), tokenizer, setup)
        path = reserve_path(RunPaths(Path(cfg.run.dir)).evals, eval_file_name(target.label, cfg.eval, split))
        atomic_write_json(path, cli_document(cfg, target, result))
        add_eval_file(results_root(cfg.run), path)
        extra = f"; {format_pass_at_k(result['pass_at_k'])}" if result.get("pass_at_k") else ""
        print(f"{target.label}: {format_accuracy(result)}{extra} -> {path}", flush=True)
    slots.release()
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
