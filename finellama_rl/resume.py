"""The config a run starts with: for a new run, the command line composed; for a run
folder that already holds a run (its marker and config.yaml), that run's own config.yaml.

    cfg = start_config(overrides)   # train (also in a requeued job), launch (every run), the job controller's OOM restart

Resuming reads config.yaml as plain data (a `${...}` in it is never resolved) and never
writes over it with what the command line composes: `train run.dir=<run>` alone resumes
the run exactly as it was configured. A setting the command line *sets* (a value typed, or
a group chosen: `trainer=ppo` sets every trainer.* key, `experiment=...` every key) that
differs from config.yaml is refused with exit 2 naming each key, unless it is allowed to
change on resume (ALLOWED: trainer.max_steps upward, evaluation settings other than
eval.protocol, tracking, the SLURM request, where the ladder starts). A relaunch of the
same sweep command composes the same config, so it differs in nothing. `debug.*`,
`dry_run` and `launcher` belong to this start only (taken from the command line, never
compared); `run.dir` is where the folder is now.

With `run.resume=false` on a run folder the run starts over (job/run_dir.py moves the old
one aside) from its config.yaml with the settings the command line sets on top, so
`train run.dir=<run> run.resume=false` repeats the same run from step 0. A requeue of the
job that already started the folder fresh resumes instead (ownership.is_replay).
"""
from __future__ import annotations

import logging
from dataclasses import fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from finellama_rl.compose import CONF_DIR, GROUPS, config_yaml, load_config, older_run_settings, parse_overrides, resolve
from finellama_rl.config import Algo, Config, EvalProtocol
from finellama_rl.errors import ConfigError, RunConfigUnreadable
from finellama_rl.fileio import atomic_write_text, read_json_object, read_run_config_data
from finellama_rl.ownership import FolderState, folder_state, is_replay, ownership_problem
from finellama_rl.results import RunPaths
from finellama_rl.validation import validate, validate_run_paths

log = logging.getLogger("finellama_rl")

# May differ from config.yaml on resume (prefixes of dotted keys). Nothing here changes
# the updates a step makes: where training stops (upward only), what evaluations measure
# (eval.protocol excepted: it is the training prompt and the rewards), trackers, the
# scheduler request, where the OOM ladder starts and whether it resubmits.
ALLOWED = ("trainer.max_steps", "eval.num_examples", "eval.max_new_tokens", "eval.batch_size", "eval.shots",
           "eval.before_training", "eval.samples", "eval.sample_temperature", "tracking", "site", "hardware.slurm",
           "ladder.start_rung", "ladder.max_resubmits", "ladder.remember_fit", "ladder.use_planner",
           "ladder.planner_margin", "hardware.runs_per_gpu")
THIS_START = ("debug", "dry_run", "launcher")  # settings of this start only: from the command line, never kept
RUN_TYPED = ("run.results_dir", "run.sweep", "run.name", "run.allow_outside_results_dir")  # kept from config.yaml unless typed


def _under(key: str, prefixes) -> bool:
    """`key` is one of `prefixes`, lies under one, or holds one (`+hardware.slurm.additional.x=y`
    sets part of the hardware.slurm.additional mapping)."""
    return any(p == "" or key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in prefixes)


def set_prefixes(overrides: Sequence[str], values_only: bool = False) -> Set[str]:
    """The keys the command line sets: a typed key, a chosen group's section (`trainer=ppo`
    -> trainer; `model@judge.model=x` -> judge.model), or everything (`experiment=...`).
    `values_only`: the typed keys alone."""
    out: Set[str] = set()
    for ov in parse_overrides(overrides):
        key = ov.key_or_group.lstrip("+~")
        group = ov.package is not None or key in GROUPS or (CONF_DIR / key).is_dir()
        if group and values_only:
            continue
        if ov.package is not None:
            out.add("" if ov.package == "_global_" else ov.package)
        elif key == "experiment":
            out.add("")  # experiment files are `@package _global_`
        else:
            out.add(key)
    return out


def leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of a Config; dicts and lists are values (hardware.slurm.additional is one)."""
    if not is_dataclass(obj):
        return {prefix: obj}
    out: Dict[str, Any] = {}
    for f in fields(obj):
        out.update(leaves(getattr(obj, f.name), f"{prefix}{f.name}" if not prefix else f"{prefix}.{f.name}"))
    return out


def _show(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else repr(value)


def _as_data(value: Any) -> Any:
    """A value as OmegaConf data that stays literal (`${` escaped)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _as_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_data(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return value.replace("${", "\\${")
    return value


# ------------------------------------------------------------------ the saved config


def _saved_node(path: Path):
    """config.yaml merged onto the schema, `${` escaped (never resolved)."""
    from omegaconf import OmegaConf

    data = older_run_settings(read_run_config_data(path))  # RunConfigUnreadable: not YAML, not a mapping, not UTF-8
    if not isinstance(data.get("eval"), dict) or "protocol" not in data["eval"]:
        data = {**data, "eval": {**(data.get("eval") or {}), "protocol": EvalProtocol.finellama.value}}  # trained on `####`
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except Exception as exc:  # omegaconf's many types: the file does not fit the schema
        if type(exc).__module__.split(".")[0] not in ("omegaconf", "yaml"):
            raise
        raise RunConfigUnreadable(f"{path} does not fit the current schema: {str(exc).splitlines()[0]}") from None


def saved_config(path: Path) -> Config:
    """A run folder's config.yaml as a typed Config (literal `${...}` text kept)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(_saved_node(path))


def record_max_steps(paths: RunPaths, max_steps: int) -> None:
    """config.yaml with trainer.max_steps set (SFT derives it from trainer.sft.epochs once the
    data is loaded); everything else stays as written."""
    cfg = saved_config(paths.config)
    atomic_write_text(paths.config, config_yaml(replace(cfg, trainer=replace(cfg.trainer, max_steps=max_steps))))


# ------------------------------------------------------------------ the config a start uses


class RunConfigDiffers(ConfigError):
    """The command line would train something other than the run folder's config.yaml."""

    def __init__(self, run_dir: Path, differing: List[Tuple[str, Any, Any, str]]):
        keys = [k for k, _, _, _ in differing]
        items = "; ".join(f"{k}: the run has {_show(s)}, the command line gives {_show(t)}{note}"
                          for k, s, t, note in differing[:6])
        more = f"; and {len(differing) - 6} more" if len(differing) > 6 else ""
        super().__init__(", ".join(keys[:8]) + (", ..." if len(keys) > 8 else ""), (
            f"{'differs' if len(keys) == 1 else 'differ'} from the config.yaml of the run in {run_dir} ({items}{more}). "
            f"Resuming keeps a run's own settings: resume it as it was with `python -m finellama_rl.train "
            f"run.dir={run_dir}` (or the same launch command as before); on resume only these may change: "
            "trainer.max_steps (upward), eval.* except eval.protocol, tracking, hardware.slurm.*, ladder.start_rung. "
            "To train with new settings choose another run.name or run.sweep, or start this run over with "
            "run.resume=false (it moves aside)"))
        self.keys = keys


def _resume_changes(saved: Config, typed: Config, prefixes: Set[str], run_dir: Path) -> Dict[str, Any]:
    """The allowed changes the command line makes; RunConfigDiffers for any other difference."""
    old, new = leaves(saved), leaves(typed)
    changes: Dict[str, Any] = {}
    differing: List[Tuple[str, Any, Any, str]] = []
    for key, value in new.items():
        if not _under(key, prefixes) or key.startswith("run.") or _under(key, THIS_START) or old.get(key) == value:
            continue
        if key == "trainer.max_steps":
            if saved.trainer.algo == Algo.sft and saved.trainer.sft.epochs is not None:
                continue  # derived from trainer.sft.epochs and the data
            if value < old[key]:
                differing.append((key, old[key], value, " (it may only go up)"))
                continue
        if _under(key, ALLOWED):
            changes[key] = value
        else:
            differing.append((key, old.get(key), value, ""))
    if differing:
        raise RunConfigDiffers(run_dir, differing)
    return changes


def _build(path: Path, changes: Dict[str, Any], fresh: bool) -> Config:
    from omegaconf import OmegaConf

    node = _saved_node(path)
    for key, value in changes.items():
        OmegaConf.update(node, key, _as_data(value), merge=False)
    cfg: Config = OmegaConf.to_object(node)
    if fresh:  # settings on top of the old run's: derive again what they derive from
        cfg = resolve(replace(cfg, trainer=replace(cfg.trainer, grad_accum=None)))
    return cfg


def start_config(overrides: Sequence[str], name_parts: Sequence[str] = (), find_run: bool = True) -> Config:
    """The config this start trains with (see the module docstring). `find_run` false: the run
    gets a folder of its own (launch's new sweep folder), so there is nothing to resume.
    ConfigError (exit 2) when the folder is not ours or the command line differs from the run."""
    typed = load_config(overrides, name_parts, check_paths=False)
    run_dir, resume = Path(typed.run.dir), typed.run.resume
    paths = RunPaths(run_dir)
    if find_run and not resume and is_replay(run_dir):
        log.info("run.resume=false was already done by this job in %s; this start (a requeue) resumes", run_dir)
        resume = True
    state = folder_state(run_dir) if find_run else FolderState.absent  # read only; paths are checked before any write
    if state not in (FolderState.ours, FolderState.legacy) or not paths.config.is_file():
        validate_run_paths(typed.run)
        problem = ownership_problem(run_dir, resume)
        if problem:
            raise ConfigError("run.dir", problem)
        return replace(typed, run=replace(typed.run, resume=resume))
    return _from_run_folder(typed, overrides, paths, resume)


def _from_run_folder(typed: Config, overrides: Sequence[str], paths: RunPaths, resume: bool) -> Config:
    problem = ownership_problem(paths.root, resume)
    if problem:
        validate_run_paths(typed.run)
        raise ConfigError("run.dir", problem)
    prefixes = set_prefixes(overrides)
    try:
        saved = saved_config(paths.config)
    except RunConfigUnreadable as exc:
        if not resume:  # starting over: the old run moves aside, its config with it
            validate_run_paths(typed.run)
            return typed
        raise ConfigError("run.dir", f"cannot resume: {exc}; to start this run over instead: run.resume=false "
                                     "(it moves aside)") from None
    if resume:
        changes = _resume_changes(saved, typed, prefixes, paths.root)
    else:
        changes = {k: v for k, v in leaves(typed).items() if _under(k, prefixes) and not k.startswith("run.")}
    new = leaves(typed)
    changes.update({k: v for k, v in new.items() if _under(k, THIS_START)})
    typed_keys = set_prefixes(overrides, values_only=True)
    changes.update({k: new[k] for k in RUN_TYPED if _under(k, typed_keys)})
    changes.update({"run.dir": typed.run.dir, "run.resume": resume})
    cfg = _build(paths.config, changes, fresh=not resume)
    validate(cfg)
    validate_run_paths(cfg.run, resuming=resume)
    return cfg


def finished_step(cfg: Config) -> Optional[int]:
    """The step a resumed run already finished at (its final evaluation, or trainer=rm's
    held-out evaluation, is at trainer.max_steps or later), else None."""
    if not cfg.run.resume:
        return None
    paths = RunPaths(Path(cfg.run.dir))
    path = paths.rm_eval if cfg.trainer.algo == Algo.rm else paths.eval_results
    doc = read_json_object(path, "the final evaluation", require={"step": int}, quiet=True)
    if doc is None or doc["step"] < cfg.trainer.max_steps:
        return None
    return doc["step"]
