"""Login-node checks before anything is submitted or run: output folder writable,
model and dataset reachable (in the local cache, or on the hub when it answers),
SLURM partition known. Each failure is a ConfigError naming the key, the run and
the fix. No torch import: this runs for every run of a sweep in seconds.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

from finellama_rl.config import Config, DataSource, SlurmConfig
from finellama_rl.errors import ConfigError
from finellama_rl.results import check_writable

PREFETCH_HINT = "python -m finellama_rl.prefetch model={model} data={data} (on a node with internet)"


class Unreachable(ConfigError):
    """A model or dataset neither in the local cache nor on a hub that answers: a launch
    stops; a dry run lists it under what it could not check and goes on."""


def _hub_cached(repo_id: str, repo_type: str, revision: Optional[str]) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        return False


def _hub_answers(repo_id: str, repo_type: str, revision: Optional[str]) -> Optional[str]:
    """None if the hub knows the repo, else the reason."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
        info(repo_id, revision=revision, timeout=15)
        return None
    except Exception as exc:
        return f"not in the local cache and the hub did not answer ({type(exc).__name__})"


def check_model(cfg: Config) -> None:
    m = cfg.model
    if m.tiny:
        return
    if m.path:
        if not (Path(m.path) / "config.json").exists():
            raise ConfigError("model.path", f"{m.path} has no config.json; point it at a saved model folder")
        return
    if _hub_cached(m.hub_id, "model", m.revision):
        return
    reason = _hub_answers(m.hub_id, "model", m.revision)
    if reason:
        hint = PREFETCH_HINT.format(model=m.name, data=cfg.data.source.value)
        raise Unreachable("model", f"{m.hub_id} is not reachable: {reason}; run {hint} or set model.path=<local folder>")


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source != DataSource.gsm8k:
        return
    for key, path in (("data.path", d.path), ("data.test_path", d.test_path)):
        if path and not Path(path).is_file():
            raise ConfigError(key, f"{path} does not exist")
    if d.path:
        return
    if _hub_cached(d.hub_id, "dataset", None):
        return
    reason = _hub_answers(d.hub_id, "dataset", None)
    if reason:
        hint = PREFETCH_HINT.format(model=cfg.model.name, data="gsm8k")
        raise Unreachable("data", f"{d.hub_id} is not reachable: {reason}; run {hint} or set data.path=<local jsonl>")


def slurm_partitions() -> List[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    return [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]


def check_partition(s: SlurmConfig, partitions: List[str]) -> None:
    part = s.partition
    if part and partitions and part not in partitions:
        raise ConfigError("hardware.slurm.partition", f"partition {part!r} does not exist here; choose one of {'|'.join(partitions)} "
                          "(set it on the command line or in your site file)")


def check_scoring(cfg: Config) -> None:
    """A reward model named as a reward source exists (a trainer=rm run, a model folder or a hub id)."""
    from finellama_rl.config import scoring_sources

    if "reward_model" in scoring_sources(cfg.trainer):
        from finellama_rl.artifacts import describe_source

        describe_source(cfg.reward_model)


def check_run(cfg: Config, slurm: bool, partitions: Optional[List[str]] = None, unchecked: Optional[List[str]] = None) -> None:
    """Every check of one run; ConfigError naming the key. With `unchecked` (a dry run), a
    model or dataset that cannot be reached from here is listed there instead of stopping."""
    try:
        check_writable(Path(cfg.run.dir))
    except PermissionError as exc:
        raise ConfigError("run.results_dir", f"{exc}; set run.results_dir=<a writable folder>") from None
    for check in (check_model, check_data):
        try:
            check(cfg)
        except Unreachable as exc:
            if unchecked is None:
                raise
            unchecked.append(f"{exc.key}: {exc.message}")
    if cfg.model.adapter:  # RL from a trained adapter: the run folder or checkpoint must hold one
        from finellama_rl.artifacts import resolve_adapter

        resolve_adapter(cfg.model.adapter)
    check_scoring(cfg)
    if slurm:
        check_partition(cfg.hardware.slurm, partitions or [])


def slurm_usable() -> tuple:
    """(usable, why not): sbatch on PATH and the controller answers sinfo."""
    if shutil.which("sbatch") is None:
        return False, "sbatch is not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"sinfo failed: {exc}"
    if out.returncode != 0:
        return False, f"sinfo failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}"
    return True, ""
