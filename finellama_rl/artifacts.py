"""Trained artifacts a run starts from or scores with, found without loading anything:
the adapter named by `model.adapter` and the reward model named by `reward_model.path`.

Both sides use this module: launch's pre-flight (login/preflight.py) checks them on the
login node before anything is submitted, and training (job/model.py, rewards/) loads
what it resolves. Pure: no torch import.

    resolve_adapter("results/sft/sft-qwen2.5-3b-a100_80")   # -> .../checkpoints/step_000500
    describe_source(cfg.reward_model)                       # -> RewardModelSource("run", ...)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finellama_rl.checkpoint import adapter_problem, latest_checkpoint
from finellama_rl.config import ModelConfig, RewardModelConfig, RewardModelKind
from finellama_rl.errors import ConfigError
from finellama_rl.fileio import read_json_object
from finellama_rl.results import RunPaths

MANIFEST = "finellama_reward_model.json"  # written by trainers/rm.py next to the reward model's adapter
ORM_FORMAT = 1  # version of rewards/reward_model.orm_text; a manifest with another version is refused

# ------------------------------------------------------------------ model.adapter

FROZEN = "sft"  # the adapter a run starts from: its PEFT name, and its folder inside checkpoints
ADAPTER_FILE = "adapter_model.safetensors"


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_FILE).is_file() and (path / "adapter_config.json").is_file()


def resolve_adapter(value: str) -> Path:
    """The adapter folder named by model.adapter: a checkpoint (or any PEFT adapter
    folder), or a run folder (its restored best checkpoint, else its latest)."""
    path = Path(value).expanduser().resolve()
    if is_adapter_folder(path):
        found = path
    elif RunPaths(path).checkpoints.is_dir():
        found = _run_final_adapter(path)
    elif path.exists():
        raise ConfigError("model.adapter", f"{value} is neither a run folder (no checkpoints/) nor an adapter folder "
                                           f"(no {ADAPTER_FILE} and adapter_config.json)")
    else:
        raise ConfigError("model.adapter", f"{value} does not exist; give a run folder (results/<sweep>/<run>) or a checkpoint folder")
    if (found / FROZEN).is_dir():
        raise ConfigError("model.adapter", f"{found} comes from a run that itself started from an adapter; "
                                           "stacking a third adapter is not supported: start from the SFT run instead")
    problem = adapter_problem(found)  # the words evaluate and a resumed run use for a damaged adapter
    if problem:
        raise ConfigError("model.adapter", f"{found} is damaged ({problem}); point model.adapter at another checkpoint")
    return found


def _run_final_adapter(run: Path) -> Path:
    best = read_json_object(RunPaths(run).best_checkpoint, "the best checkpoint")
    if best is not None and best.get("restored") is True and isinstance(best.get("checkpoint"), str) \
            and is_adapter_folder(Path(best["checkpoint"])):
        return Path(best["checkpoint"])
    ckpt = latest_checkpoint(RunPaths(run).checkpoints)
    if ckpt is None or not is_adapter_folder(ckpt):
        raise ConfigError("model.adapter", f"run folder {run} has no committed LoRA checkpoint yet")
    return ckpt


# ------------------------------------------------------------------ where it comes from


@dataclass
class RewardModelSource:
    """Resolved reward_model.path: what to load."""

    kind: str  # "run" (a trainer=rm run: base + adapter) | "folder" | "hub"
    weights: Optional[str] = None  # the model folder or hub id to load (folder, hub)
    adapter: Optional[str] = None  # the LoRA adapter with the head (run)
    base_model: Optional[ModelConfig] = None  # the base the run trained (run; model.py builds a tiny one)


def describe_source(rm: RewardModelConfig) -> RewardModelSource:
    """Resolve reward_model.path without loading anything (also on the login node: launch's
    pre-flight); ConfigError when it is not a reward model."""
    if not rm.path:
        raise ConfigError("reward_model.path", "is not set: name a trainer=rm run folder or a reward model folder")
    path = Path(rm.path)
    run = RunPaths(path).reward_model if (RunPaths(path).reward_model / MANIFEST).is_file() else path
    if (run / MANIFEST).is_file():
        manifest = json.loads((run / MANIFEST).read_text())
        if manifest.get("orm_format") != ORM_FORMAT:
            raise ConfigError("reward_model.path", f"{run} was trained with input format {manifest.get('orm_format')}, "
                                                   f"this version reads format {ORM_FORMAT}; retrain with trainer=rm")
        if rm.kind != RewardModelKind.orm:
            raise ConfigError("reward_model.kind", f"{rm.path} is an outcome reward model (trainer=rm); set reward_model.kind=orm")
        return RewardModelSource("run", None, str(run), ModelConfig(**manifest["base_model"]))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError("reward_model.path", f"{path} is neither a trainer=rm run folder (no {RunPaths(path).reward_model.name}/{MANIFEST}) "
                                                   "nor a model folder (no config.json)")
        return RewardModelSource("folder", str(path))
    if rm.path.count("/") == 1 and not rm.path.startswith((".", "/", "~")):
        return RewardModelSource("hub", rm.path)  # e.g. Qwen/Qwen2.5-Math-PRM-7B (from the HF cache offline)
    raise ConfigError("reward_model.path", f"{rm.path} not found: train one with trainer=rm (see README "
                                           "'Reward sources') or point it at a reward model folder")
