"""Experiment tracking the way people already watch runs: every metric record that
goes to metrics.jsonl (and every evaluation) also goes to TensorBoard event files
and/or Weights & Biases, chosen with one setting.

    python -m finellama_rl.launch experiment=smoke tracking=tensorboard
    tensorboard --logdir results/<sweep>          # one curve per run folder
    python -m finellama_rl.launch ... tracking=wandb   # offline unless WANDB_MODE=online; `wandb sync` later

`tracking=none` (the default) creates nothing and imports nothing. The same hook
serves SFT, GRPO and PPO: the monitor calls `ExperimentTracker.log` where it writes
metrics.jsonl. TensorBoard files live in `<run>/tensorboard/`; on resume, events of
steps after the checkpoint are purged (like metrics.jsonl's rewind). W&B runs are
offline by default (compute nodes often have no network; `wandb sync <run>/wandb/...`
uploads later); the W&B run id is derived from the run folder, so a requeued job
continues the same W&B run. Only the main process of a multi-device run tracks.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from finellama_rl.config import Config, Tracking
from finellama_rl.results import RunPaths

log = logging.getLogger(__name__)



class TensorBoardSink:
    """Scalars into <run>/tensorboard/ through torch's SummaryWriter (needs `tensorboard`)."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: drop events at or after it, written by an attempt whose work was lost since the checkpoint
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run folder; offline unless WANDB_MODE says otherwise."""

    def __init__(self, cfg: Config, root: Path):
        import wandb

        run_id = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "finellama_rl"), name=cfg.run.name, group=cfg.run.sweep,
            id=run_id, resume="allow", dir=str(root), mode=os.environ.get("WANDB_MODE", "offline"),
            config=_flat_config(cfg), reinit="finish_previous")

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def _flat_config(cfg: Config) -> Dict[str, Any]:
    from dataclasses import asdict
    from enum import Enum

    out: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value.value if isinstance(value, Enum) else value

    walk("", asdict(cfg))
    return out


class ExperimentTracker:
    """Fans metric records out to the chosen sinks; a failing sink is dropped with a
    warning, never failing the run."""

    def __init__(self, sinks: List[Any]):
        self.sinks = sinks

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        for sink in list(self.sinks):
            try:
                sink.log(step, scalars)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                log.warning("tracking: %s failed (%s); no more metrics go there", type(sink).__name__, exc)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: closing %s failed: %s", type(sink).__name__, exc)
        self.sinks = []


def open_tracker(cfg: Config, root: Path, start_step: int) -> Optional[ExperimentTracker]:
    """The run's tracker, or None for tracking=none (nothing imported, nothing written)."""
    from finellama_rl.job import distributed

    if cfg.tracking == Tracking.none or not distributed.is_main():
        return None
    sinks: List[Any] = []
    if cfg.tracking in (Tracking.tensorboard, Tracking.all):
        sinks.append(TensorBoardSink(RunPaths(root).tensorboard, start_step))
    if cfg.tracking in (Tracking.wandb, Tracking.all):
        sinks.append(WandbSink(cfg, root))
    if cfg.tracking not in (Tracking.tensorboard, Tracking.wandb, Tracking.all):
        raise ValueError(f"unknown tracking {cfg.tracking!r}: expected none|tensorboard|wandb|all")
    log.info("tracking metrics to %s", ", ".join(type(s).__name__.replace("Sink", "") for s in sinks))
    return ExperimentTracker(sinks)


def eval_scalars(result: Dict[str, Any]) -> Dict[str, float]:
    """An evaluation as tracked scalars: eval/accuracy (the protocol's primary scorer) and
    eval/accuracy/<scorer> for every scorer."""
    acc = result.get("accuracy") or {}
    out = {f"eval/accuracy/{name}": float(value) for name, value in acc.items()}
    if result.get("primary") in acc:
        out["eval/accuracy"] = float(acc[result["primary"]])
    passk = result.get("pass_at_k") or {}
    for k, value in (passk.get(passk.get("primary", "")) or {}).items():
        out[f"eval/pass@{k}"] = float(value)
    return out
