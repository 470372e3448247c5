"""The run folder as a job sees it: made ours (its marker) and, with run.resume=false, the
earlier run moved aside before training; metric lines of steps lost since the checkpoint
set aside on resume; the last logged step, the job's deadline, and the signals that ask
it to save.

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
from finellama_rl.ownership import claim, is_lock_file, is_replay, record_fresh_start
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import job_ref

log = logging.getLogger("finellama_rl")


def prepare_run_dir(cfg: Config) -> RunPaths:
    """Make the folder ours (the caller holds its run.lock): created with its marker, or
    refused (exit 2) when it holds files that are not a run's (ownership.claim). With
    run.resume=false (once per job: a requeue replays it and resumes instead), move the
    earlier run aside into a sibling folder, never deleting. config.yaml is written when it
    is new or differs."""
    paths = RunPaths(Path(cfg.run.dir))
    claim(paths.root, "train", resume=cfg.run.resume)
    if not cfg.run.resume and not is_replay(paths.root):
        aside = move_aside(paths)
        record_fresh_start(paths.root, aside)
        if aside is not None:
            log.info("run.resume=false: moved the earlier run to %s", aside)
    paths.make()
    text = config_yaml(cfg)
    if not paths.config.is_file() or paths.config.read_bytes() != text.encode():
        atomic_write_text(paths.config, text)
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


def move_aside(paths: RunPaths) -> Optional[Path]:
    """Move the earlier run into `<run>-previous-<time>/` (with a copy of the marker); None
    when there is none. Stay: the marker, the locks, and logs/submitit and logs/watch,
    submitit's folders, where the current job's own files are (its pickles, log and result:
    every name there carries its job id). Of logs/job_events.jsonl the current job's lines
    stay, the earlier jobs' move."""
    own = {paths.logs.name, paths.marker.name}
    earlier = [p for p in paths.root.iterdir() if p.name not in own and not is_lock_file(p.name, paths)]
    kept = (paths.submitit_logs, paths.watch_logs, paths.job_events)
    in_logs = [p for p in paths.logs.iterdir() if p not in kept] if paths.logs.is_dir() else []
    job = job_ref()  # the controller writes `<array>_<task>` for an array task
    events = read_jsonl(paths.job_events, quiet=True)
    mine = [e for e in events if job and str(e.get("job_id")) == job]
    if not earlier and not in_logs and len(mine) == len(events):
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = paths.root.with_name(f"{paths.root.name}-previous-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    moved = RunPaths(aside)
    for p in earlier:
        shutil.move(str(p), str(aside / p.name))
    if len(mine) < len(events):
        in_logs.append(paths.job_events)
    if in_logs:
        moved.logs.mkdir()
        for p in in_logs:
            shutil.move(str(p), str(moved.logs / p.name))
    for event in mine if paths.job_events in in_logs else []:
        append_jsonl(paths.job_events, event)
    shutil.copy2(paths.marker, moved.marker)
    return aside


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
