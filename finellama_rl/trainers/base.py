"""The small interface both algorithms sit behind, so that checkpoints, metrics,
evaluation, resume and the OOM ladder are written once.

An algorithm (grpo, ppo, sft) is a function `train(ctx: TrainContext) -> TrainOutcome`. It trains
from `ctx.resume_from` (or from scratch) until `trainer.max_steps` or a stop
decision, calls `ctx.monitor.log/decide` as it goes, and writes checkpoints with
`ctx.save_checkpoint` (staging folder in, committed step folder out). GRPO and PPO
also report their phases to `ctx.tracker` and leave a host-memory snapshot in
`ctx.snapshots` after every global step (no step is redone after an OOM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from finellama_rl.config import Config
from finellama_rl.job.monitor import TrainingMonitor
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
    # OOM attribution: trainers wrap generation/scoring/training/optimizer phases in
    # tracker.phase(...) and set tracker.step (finellama_rl/ladder/attempts.py).
    tracker: Any = field(default_factory=lambda: _new_tracker())
    # Host-memory snapshot after every global step, kept across ladder attempts
    # (finellama_rl/job/snapshot.py): an OOM retries the failing step from it.
    snapshots: Any = field(default_factory=lambda: _new_holder())


def bare_context(cfg: Config, reward_funcs: Optional[List[Callable]] = None, resume_from: Optional[Path] = None,
                 start_step: int = 0, label: str = "bare") -> TrainContext:
    """A TrainContext like train.py's, without evaluation, the OOM ladder or tracking: for
    tests and benchmarks that call a trainer directly. Prompts come from data.system_prompt
    and the rule rewards of trainer.rewards (unless `reward_funcs` is given); metrics lines
    are written but not printed. The tiny model is built before seeding (building consumes RNG)."""
    import transformers

    from finellama_rl.task.data import load_problems, with_prompts
    from finellama_rl.job.model import ensure_tiny_model, load_policy, load_tokenizer
    from finellama_rl.rewards.rules import build_reward_funcs

    if cfg.model.tiny:
        ensure_tiny_model(cfg.model)
    transformers.set_seed(cfg.trainer.seed)
    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    rows, _ = with_prompts(load_problems(cfg.data, "train"), tok, cfg.data.system_prompt, cfg.trainer.max_prompt_tokens)
    paths = RunPaths(Path(cfg.run.dir)).make()
    monitor = TrainingMonitor(cfg.trainer, paths, start_step, label, print_fn=lambda s: None)
    funcs = reward_funcs or build_reward_funcs(cfg.trainer.rewards)
    return TrainContext(cfg, paths, policy, tok, rows, funcs, monitor, lambda m, s: {}, resume_from, start_step)


def _new_tracker():
    from finellama_rl.job.faults import PhaseTracker

    return PhaseTracker()


def _new_holder():
    from finellama_rl.job.snapshot import SnapshotHolder

    return SnapshotHolder()


@dataclass
class TrainOutcome:
    final_step: int
    stopped_early: bool
    stop_reason: str = ""
    restored_step: Optional[int] = None  # SFT keep_best: the checkpoint whose weights the policy ends with
