"""The OOM ladder across the scheduler, inside the job: when SLURM kills a run's srun step
for going over its memory (state OUT_OF_MEMORY), or the run dies of an out-of-memory error
it could not catch, the job's controller (login/controller.py) asks `record_oom_kill`,
which records the attempt in attempts.jsonl and says whether to start the run again; the
new process starts at the next rung (finellama_rl.ladder.attempts.start_point). No job is
resubmitted and nothing waits in the queue. Restarts are bounded by ladder.max_resubmits
(the attempts recorded as `oom_killed` count, so a requeued job does not reset them).

Older sweeps ran a watchdog job per run (`--dependency=afterany`) for this; their ledger
lines (kind `watchdog`) are still read by status and --cancel.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from finellama_rl.fileio import read_json_object, read_jsonl
from finellama_rl.ladder.attempts import close_attempt, read_attempts, record_attempt, start_rung
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.results import RunPaths

OOM_LOG_MARKERS = ("outofmemoryerror", "cuda error: out of memory", "memoryerror", "cannot allocate memory")


def log_says_oom(log: Path, offset: int = 0) -> bool:
    """The run's log, from `offset` on (what the failed process wrote), shows an
    out-of-memory error. Not the in-job ladder's caught OOMs ("out of memory at rung"),
    only the error a process died of."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, offset))
            tail = f.read()[-20000:].decode("utf-8", errors="replace").lower()
    except OSError:
        return False
    return any(marker in tail for marker in OOM_LOG_MARKERS)


def record_oom_kill(argv: List[str], run_dir: str, job_id: str, state: str, wall_time_s: float) -> Tuple[bool, str]:
    """After the run's process was killed for memory: record the attempt (at the rung its
    marker names) and return (start it again?, why). Again when a rung is left below and
    fewer than ladder.max_resubmits restarts were used."""
    from finellama_rl.resume import start_config

    cfg = start_config(argv)  # the run's own config.yaml (argv resumes it)
    paths = RunPaths(Path(run_dir))
    if not cfg.ladder.enabled:
        return False, "ladder.enabled=false: not retried"
    ladder = ladder_for(cfg)
    current = (read_json_object(paths.current_attempt, "the attempt marker", require={"rung": int, "step0": int})
               or {"rung": min(start_rung(cfg.ladder, paths, ladder), len(ladder) - 1), "step0": 0})
    steps = [r["step"] for r in read_jsonl(paths.metrics, require={"step": int})]
    record_attempt(paths, ladder[min(max(current["rung"], 0), len(ladder) - 1)], "oom_killed",
                   error=f"SLURM: {state} (job {job_id})",
                   steps_done=max(0, (steps[-1] if steps else 0) - current["step0"]), wall_time_s=wall_time_s,
                   peak_gpu_mem_gb=None, job_id=job_id)
    close_attempt(paths)  # recorded here: the next start must not record it again as `killed`
    kills = sum(1 for a in read_attempts(paths) if a["outcome"] == "oom_killed")
    if kills > cfg.ladder.max_resubmits:
        return False, f"killed for memory; ladder.max_resubmits={cfg.ladder.max_resubmits} restarts used"
    nxt = start_rung(cfg.ladder, paths, ladder)
    if nxt >= len(ladder):
        return False, "killed for memory on the last rung"
    return True, f"rung {nxt}"
