"""The small interface both algorithms sit behind, so that checkpoints, metrics,
evaluation, resume and the OOM ladder are written once.

An algorithm is a function `train(ctx: TrainContext) -> TrainOutcome`. It trains
from `ctx.resume_from` (or from scratch) until `trainer.max_steps` or a stop
decision, calls `ctx.monitor.log/decide` as it goes, and writes checkpoints with
`ctx.save_checkpoint` (staging folder in, committed step folder out).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from finellama_rl.config import Config
from finellama_rl.monitor import TrainingMonitor
from finellama_rl.results import RunPaths


@dataclass
class TrainContext:
    cfg: Config
    paths: RunPaths
    policy: Any  # PeftModel (or a plain model when LoRA is off)
    tokenizer: Any
    train_rows: List[Dict[str, str]]  # {prompt, question, answer}
    reward_funcs: List[Callable]
    monitor: TrainingMonitor
    evaluate: Callable[[Any, int], Dict[str, Any]]  # (model, step) -> summary, for eval_every
    resume_from: Optional[Path] = None
    start_step: int = 0
    extra_state: Dict[str, Any] = field(default_factory=dict)  # written into finellama_state.json


@dataclass
class TrainOutcome:
    final_step: int
    stopped_early: bool
    stop_reason: str = ""
