"""What both algorithms share while training: metric records, progress lines, and
the per-step decision to checkpoint, evaluate or stop.

An algorithm calls `monitor.log(step, metrics)` when it has metrics and
`monitor.decide(step)` after every optimizer step; the decision already accounts
for the save schedule, a pending SLURM signal, the job's time limit and the
`debug.crash_after_step` test hook. The training side knows nothing of SLURM
beyond "a signal asks me to save" (`request_stop`, or the supervisor's stop file in a
multi-device run).

Data parallel: every rank calls `decide` at every step and the decisions are agreed
(one small all-reduce), so a signal or a time limit seen by one rank stops all of
them at the same step; only rank 0 writes metrics.jsonl and prints.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from finellama_rl.console import format_duration
from finellama_rl.config import TrainerConfig
from finellama_rl.results import RunPaths
from finellama_rl.fileio import append_jsonl


@dataclass(frozen=True)
class Decision:
    save: bool
    evaluate: bool
    stop: bool
    reason: str = ""


class TrainingMonitor:
    def __init__(self, trainer: TrainerConfig, paths: RunPaths, start_step: int, label: str,
                 crash_after_step: Optional[int] = None, deadline: Optional[float] = None,
                 print_fn: Callable[[str], None] = lambda s: print(s, flush=True), step_sleep_s: float = 0.0):
        self.t = trainer
        self.paths = paths
        self.label = label
        self.start_step = start_step
        self.crash_after_step = crash_after_step
        self.step_sleep_s = step_sleep_s  # debug.step_sleep_s: a known wall time per step (time-limit tests)
        self.deadline = deadline  # wall-clock time by which we must have saved (time limit minus margin)
        self.print = print_fn
        self.stop_reason: Optional[str] = None
        self._t0 = time.monotonic()
        self._last_log_time = self._t0
        self._last_log_step = start_step
        self._step_times: list[float] = []
        # Callables (steps since the last line) -> extra metrics for each line, e.g. the
        # scoring time and memory of model-backed reward sources (rewards/sources.py).
        self.metric_sources: list[Callable[[int], Dict[str, float]]] = []
        # TensorBoard / W&B (finellama_rl/job/tracking.py); None with tracking=none.
        self.experiment_tracker = None

    def request_stop(self, reason: str) -> None:
        """Called from a signal handler: save at the end of this step, then stop."""
        self.stop_reason = self.stop_reason or reason

    def seconds_per_step(self) -> float:
        done = self._last_log_step - self.start_step
        return (self._last_log_time - self._t0) / done if done > 0 else float("nan")

    def log(self, step: int, metrics: Dict[str, float], tokens: Optional[float] = None) -> Dict[str, float]:
        from finellama_rl.job import distributed

        now = time.monotonic()
        steps = max(1, step - self._last_log_step)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        for source in self.metric_sources:
            record.update({k: float(v) for k, v in source(steps).items()})
        record["perf/sec_per_step"] = (now - self._last_log_time) / steps
        if tokens is not None:
            record["perf/tokens_per_sec"] = tokens / max(now - self._last_log_time, 1e-9)
        record["time/elapsed_s"] = now - self._t0
        self._last_log_time, self._last_log_step = now, step
        if distributed.is_main():
            append_jsonl(self.paths.metrics, record)
            self.track(step, record)
            self.print(self.progress_line(record))
        return record

    def track(self, step: int, metrics: Dict[str, float]) -> None:
        """Also send a record (metrics line, evaluation) to TensorBoard / W&B when tracking is on."""
        if self.experiment_tracker is not None:
            self.experiment_tracker.log(step, metrics)

    def progress_line(self, r: Dict[str, float]) -> str:
        step, total = int(r["step"]), self.t.max_steps
        sps = self.seconds_per_step()
        eta = format_duration(sps * (total - step)) if math.isfinite(sps) else "?"
        parts = [f"[{self.label}] step {step}/{total}"]
        for key, name in (("train/reward_mean", "reward"), ("train/loss", "loss"), ("train/kl", "kl")):
            if key in r:
                parts.append(f"{name} {r[key]:.4f}")
        parts += [f"{r['perf/sec_per_step']:.2f} s/step", f"ETA {eta}"]
        return " | ".join(parts)

    def decide(self, step: int) -> Decision:
        if self.step_sleep_s > 0:  # a signal meanwhile runs its handler; the stop is decided below
            time.sleep(self.step_sleep_s)
        evaluate = bool(self.t.eval_every) and step % self.t.eval_every == 0 and step < self.t.max_steps
        scheduled = step % self.t.save_every == 0 or step >= self.t.max_steps
        stop, early = self._agreed(bool(self.stop_reason) or self._stop_file(),
                                   not scheduled and self._save_would_come_too_late(step))
        if stop:
            self.request_stop("stop requested (signal on another rank or to the supervisor)")
            return Decision(save=True, evaluate=False, stop=True, reason=self.stop_reason)
        if self.crash_after_step is not None and step >= self.crash_after_step:
            return Decision(save=scheduled, evaluate=False, stop=True, reason="debug.crash_after_step")
        if early:
            return Decision(save=True, evaluate=evaluate, stop=False, reason="time limit near: saving early")
        return Decision(save=scheduled, evaluate=evaluate, stop=False)

    def _stop_file(self) -> bool:
        from finellama_rl.job import distributed

        return distributed.world() > 1 and distributed.stop_requested(self.paths)

    @staticmethod
    def _agreed(*flags: bool) -> tuple:
        """Each flag true if it is true on any rank (one all-reduce; local in one process)."""
        from finellama_rl.job import distributed

        if not distributed.initialized():
            return flags
        import torch

        t = torch.tensor([float(f) for f in flags], device="cuda" if torch.cuda.is_available() else "cpu")
        return tuple(bool(v) for v in distributed.all_reduce_max(t).tolist())

    def _save_would_come_too_late(self, step: int) -> bool:
        """True when the next scheduled save would land after the deadline."""
        if self.deadline is None:
            return False
        sps = self.seconds_per_step()
        if not math.isfinite(sps):
            return False
        next_save = (step // self.t.save_every + 1) * self.t.save_every
        finish = time.time() + sps * (next_save - step) * 1.2
        if finish > self.deadline:
            self.deadline = None  # one early save per job is enough; the signal covers the rest
            return True
        return False
