"""The in-job OOM ladder loop: attempts at ever cheaper rungs until one finishes.

An out-of-memory anywhere in an attempt (generation, scoring, forward, backward,
optimizer, evaluation) is recorded in attempts.jsonl with its phase; the model is
freed, the ladder steps down the knob of that phase (ladder.step_down: the
generation batch after a generation OOM, the micro batch otherwise) and training
continues in this same process from the host-memory snapshot of the last finished
step (job/snapshot.py): no requeue, no queue time lost, no step redone. With
several ranks the rank that ran out records the attempt, writes the snapshot and
exits EXIT_OOM_RETRY; the supervisor (finellama_rl.job.distributed) starts every rank
again, and they all read the same attempts.jsonl and step down together.

Used by finellama_rl.trainers.run.run_ladder, which prepares the run folder and passes the
function that runs one attempt.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from finellama_rl.config import Config
from finellama_rl.ladder.rungs import Rung
from finellama_rl.results import RunPaths
from finellama_rl.errors import EXIT_LADDER_EXHAUSTED, EXIT_OOM_RETRY

log = logging.getLogger("finellama_rl")



class AttemptRun:
    """What one attempt shares with the ladder loop: the snapshot holder (kept across
    attempts) and the attempt's phase tracker (set once the model is loaded)."""

    def __init__(self, snapshots=None):
        from finellama_rl.job.snapshot import SnapshotHolder

        self.snapshots = snapshots if snapshots is not None else SnapshotHolder()
        self.tracker = None


def _after_oom(paths: RunPaths, ladder: List[Rung], rung: Rung, run: AttemptRun, exc: BaseException,
               fields: Dict[str, Any], attempt_no: int) -> Optional[Rung]:
    """Record an out-of-memory (with its phase) and write the snapshot; returns the rung to
    retry at. With several ranks this process exits instead (the supervisor restarts all)."""
    from finellama_rl.job import distributed as dist
    from finellama_rl.ladder.attempts import close_attempt, record_attempt
    from finellama_rl.job.faults import phase_of
    from finellama_rl.checkpoint import latest_checkpoint, step_of
    from finellama_rl.ladder.rungs import step_down

    phase = phase_of(exc, run.tracker)
    traceback.clear_frames(exc.__traceback__)  # drop the frames that hold the model
    if dist.world() > 1 and not dist.claim(paths.oom_claim(attempt_no)):
        os._exit(EXIT_OOM_RETRY)  # another rank records this OOM
    record_attempt(paths, rung, "oom", phase=phase, rank=dist.rank(), **fields)
    close_attempt(paths)
    latest = latest_checkpoint(paths.checkpoints)
    snap = run.snapshots.write(paths.checkpoints, step_of(latest) if latest else 0)
    log.warning("out of memory at rung %d in %s: %s%s", rung.index, phase, fields["error"],
                f"; continuing from the snapshot of step {step_of(snap)}" if snap else "")
    if dist.world() > 1:  # the other ranks are stuck in a collective: the supervisor restarts all of them
        dist.write_exit_code(paths, EXIT_OOM_RETRY)
        os._exit(EXIT_OOM_RETRY)
    return step_down(ladder, rung, phase)


@dataclass
class AttemptHooks:
    """What the loop needs from finellama_rl.train (passed in: train imports this module)."""

    attempt: Callable[[Config, RunPaths, AttemptRun], int]  # one attempt at one rung -> exit code
    last_step: Callable[[RunPaths], int]  # the last step in metrics.jsonl
    fields: Callable[[RunPaths, int, float, Optional[BaseException]], Dict[str, Any]]  # attempts.jsonl fields
    free_memory: Callable[[], None]
    outcomes: Dict[int, str]  # exit code -> attempts.jsonl outcome


def run_attempts(cfg: Config, paths: RunPaths, ladder: List[Rung], hooks: AttemptHooks) -> int:
    """Attempts from start_point down the ladder; returns the exit code of the one that ended."""
    from finellama_rl.job import distributed as dist
    from finellama_rl.ladder.attempts import (close_attempt, format_attempts, open_attempt, read_attempts, record_attempt,
                                       start_point)
    from finellama_rl.ladder.fitmem import remember_fit
    from finellama_rl.ladder.rungs import format_ladder, is_oom_error
    from finellama_rl.ladder.run_ladder import config_at
    from finellama_rl.job.snapshot import SnapshotHolder

    main = dist.is_main()
    rung = first = start_point(cfg.ladder, paths, ladder)
    holder = SnapshotHolder()  # survives attempts: the last finished step, in host memory
    while rung is not None:
        if rung != ladder[0]:
            log.warning("ladder rung %d: %s%s", rung.index, rung.description,
                        " (CHANGES THE EXPERIMENT: shorter sequences)" if rung.changes_experiment else "")
        started, step0, attempt_no = time.time(), hooks.last_step(paths), len(read_attempts(paths)) + 1
        if main:  # if the scheduler kills us (host OOM, uncatchable GPU OOM), the job's controller or the next start reads this
            open_attempt(paths, rung.index, step0, started)
        run = AttemptRun(holder)
        try:
            code = hooks.attempt(config_at(cfg, rung), paths, run)
        except Exception as exc:  # noqa: BLE001 - only OOMs are handled; everything else is re-raised
            fields = hooks.fields(paths, step0, started, exc)
            if dist.world() > 1 and paths.oom_claim(attempt_no).exists():
                os._exit(EXIT_OOM_RETRY)  # a peer ran out of memory (this error is the broken collective)
            if not (cfg.ladder.enabled and is_oom_error(exc)):
                if main:
                    record_attempt(paths, rung, "error", **fields)
                    close_attempt(paths)
                raise
            rung = _after_oom(paths, ladder, rung, run, exc, fields, attempt_no)
            del exc
            run = None
            hooks.free_memory()
            continue
        if main:
            record_attempt(paths, rung, hooks.outcomes.get(code, "failed"), **hooks.fields(paths, step0, started, None))
            close_attempt(paths)
            if code == 0 and cfg.ladder.remember_fit and cfg.ladder.enabled:
                remember_fit(cfg, rung, clean=rung == first)  # never for debug.* runs (fitmem refuses)
        return code
    if main:
        print("out of memory on every rung of the ladder; attempts:\n" + format_attempts(read_attempts(paths)), flush=True)
        print("ladder:\n" + format_ladder(ladder), flush=True)
    return EXIT_LADDER_EXHAUSTED
