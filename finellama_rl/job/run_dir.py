"""The run folder as a job sees it: made (and, with run.resume=false, the earlier run
moved aside) before training, metric lines of steps lost since the checkpoint set aside on
resume, the last logged step, the job's deadline, and the signals that ask it to save.

Used by finellama_rl.trainers.run (one run, start to end) and finellama_rl.train (the
supervisor of several ranks). The caller holds the folder's run.lock.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Optional

from finellama_rl.compose import config_yaml
from finellama_rl.config import Config
from finellama_rl.fileio import append_jsonl, atomic_write_text, read_jsonl
from finellama_rl.results import RunPaths

log = logging.getLogger("finellama_rl")


def prepare_run_dir(cfg: Config) -> RunPaths:
    """Make the folder (the caller holds its run.lock); with run.resume=false, move
    earlier outputs aside into a sibling folder (never delete; the lock stays)."""
    paths = RunPaths(Path(cfg.run.dir))
    earlier = [p for p in paths.root.iterdir() if p != paths.lock] if paths.root.is_dir() else []
    if not cfg.run.resume and earlier:
        aside = paths.root.with_name(paths.root.name + "-previous-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        aside.mkdir()
        for p in earlier:
            shutil.move(str(p), str(aside / p.name))
        log.info("run.resume=false: moved the earlier run to %s", aside)
    paths.make()
    atomic_write_text(paths.config, config_yaml(cfg))
    return paths


def refuse_unusable(cfg: Config, paths: RunPaths) -> None:
    """Before a resumed run writes anything or loads a model: a folder where the run writes a
    file (metrics.jsonl/, attempts.jsonl/, logs/current_attempt.json/), a file where it keeps
    a folder, or a resume point holding pickled objects stops it with one line (exit 2)."""
    from finellama_rl.checkpoint import latest_resume_point
    from finellama_rl.errors import ConfigError

    if not cfg.run.resume:
        return
    wrong = paths.wrong_kinds()
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ConfigError("run.dir", f"{wrong[0]}{more}; move it out of the way to resume this run")
    resume_from = latest_resume_point(paths.checkpoints, quiet=True) if paths.checkpoints.is_dir() else None  # warned later
    if resume_from is not None:
        from finellama_rl.job.snapshot import unsafe_pickle

        problem = unsafe_pickle(resume_from)
        if problem:
            raise ConfigError("run.dir", f"refusing to resume from {resume_from.name}: {problem}; remove {resume_from} "
                                         "to resume from the checkpoint before it")


def job_deadline() -> Optional[float]:
    """Epoch seconds by which to have saved, from FINELLAMA_DEADLINE if the launcher set it."""
    value = os.environ.get("FINELLAMA_DEADLINE")
    return float(value) if value else None


def rewind_metrics(paths: RunPaths, step: int) -> int:
    """Keep metrics.jsonl consistent with the checkpoint we resume from: records of
    later steps (trained, then lost in a crash) move to metrics_discarded.jsonl."""
    records = read_jsonl(paths.metrics, require={"step": int})  # malformed lines: warned, then dropped here
    later = [r for r in records if r["step"] > step]
    if not later:
        return 0
    for r in later:
        append_jsonl(paths.metrics_discarded, r)
    kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
    atomic_write_text(paths.metrics, kept)
    return len(later)


def last_logged_step(paths: RunPaths) -> int:
    records = read_jsonl(paths.metrics, require={"step": int}, quiet=True)  # rewind_metrics warns about bad lines
    return records[-1]["step"] if records else 0


def install_stop_handlers(monitor) -> None:
    """USR2 (SLURM's warning before the time limit) and TERM (preemption, scancel): save
    at the end of the current step and stop (the monitor decides)."""
    def handler(signum, _frame):
        log.warning("received %s: will save and stop after this step", signal.Signals(signum).name)
        monitor.request_stop(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, handler)
