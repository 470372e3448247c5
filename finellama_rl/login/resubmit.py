"""The OOM ladder across the scheduler: a small watchdog job that SLURM starts after
a training job ends (`--dependency=afterany:<job>`). If the job was killed for
memory (state OUT_OF_MEMORY on the job or a step, or FAILED with an out-of-memory
message it could not catch), the watchdog records the attempt in attempts.jsonl
and resubmits training (plus a new watchdog); the new job starts at the next rung
(finellama_rl.ladder.attempts.start_rung). Nothing keeps running on the login node.
Resubmissions are bounded by ladder.max_resubmits.

Submitted by finellama_rl.login.slurm.submit_watchdog; `finellama_rl.login.slurm.watch` runs on a compute
node and calls `decide_resubmit` here (this module never imports submitit).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import List, Optional, Tuple

from finellama_rl.ladder.attempts import close_attempt, record_attempt, start_rung
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.results import RunPaths
from finellama_rl.fileio import append_jsonl, read_json_object, read_jsonl

FINAL_WAIT_S = 120
OOM_LOG_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory")


def sacct_lines(job_id: str) -> List[Tuple[str, str, str]]:
    """(id, state, elapsed) for the job and its steps, every run of it (-D)."""
    out = subprocess.run(["sacct", "-n", "-P", "-D", "-o", "JobID,State,Elapsed", "-j", job_id],
                         capture_output=True, text=True, timeout=60).stdout
    return [tuple(line.split("|")[:3]) for line in out.splitlines() if line.count("|") >= 2]


def final_lines(job_id: str) -> List[Tuple[str, str, str]]:
    """Wait until sacct shows the job ended (the dependency fired, but sacct can lag)."""
    deadline = time.time() + FINAL_WAIT_S
    lines = sacct_lines(job_id)
    while time.time() < deadline and any(s.split()[0] in ("RUNNING", "PENDING", "COMPLETING") for i, s, _ in lines if i == job_id):
        time.sleep(5)
        lines = sacct_lines(job_id)
    return lines


def log_says_oom(run_dir: str, job_id: str) -> bool:
    """The job's log (stdout and stderr share the .out file; older jobs had a .err) ends with an OOM."""
    logs = RunPaths(Path(run_dir)).submitit_logs
    for path in [*logs.glob(f"{job_id}_*_log.out"), *logs.glob(f"{job_id}_*_log.err")]:
        try:
            tail = path.read_bytes()[-20000:].decode("utf-8", errors="replace").lower()
        except OSError:
            continue
        if any(marker in tail for marker in OOM_LOG_MARKERS):
            return True
    return False


def killed_for_memory(run_dir: str, job_id: str) -> Tuple[bool, str]:
    lines = final_lines(job_id)
    states = [s.split()[0] for _, s, _ in lines]
    job_state = next((s.split()[0] for i, s, _ in reversed(lines) if i == job_id), "UNKNOWN")
    if "OUT_OF_MEMORY" in states:
        return True, "OUT_OF_MEMORY"
    if job_state == "FAILED" and log_says_oom(run_dir, job_id):
        return True, "FAILED with an uncaught out-of-memory error"
    return False, job_state


def elapsed_s(job_id: str) -> float:
    for i, _, elapsed in reversed(sacct_lines(job_id)):
        if i == job_id:
            try:
                parts = [int(p) for p in elapsed.replace("-", ":").split(":")]
            except ValueError:
                return 0.0
            return float(sum(p * 60 ** k for k, p in enumerate(reversed(parts))))
    return 0.0


def note(paths: RunPaths, event: str, **fields) -> None:
    append_jsonl(paths.job_events, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields})
    print(f"[finellama_rl watchdog] {event} {fields}", flush=True)


def decide_resubmit(argv: List[str], run_dir: str, job_id: str, resubmits_done: int) -> Tuple[Optional[object], str]:
    """After `job_id` ended: (config to resubmit, message) if it died for memory and
    a rung and a resubmission are left, else (None, why not). Records the attempt.
    The submission itself is finellama_rl.login.slurm.watch's job (this module never submits)."""
    from finellama_rl.resume import start_config

    cfg = start_config(argv)  # the run's own config.yaml (argv resumes it)
    paths = RunPaths(Path(run_dir))
    oom, state = killed_for_memory(run_dir, job_id)
    if not oom:
        note(paths, "watchdog_done", job_id=job_id, state=state)
        return None, f"job {job_id} ended {state}: nothing to do"
    ladder = ladder_for(cfg)
    current = (read_json_object(paths.current_attempt, "the attempt marker", require={"rung": int, "step0": int})
               or {"rung": min(start_rung(cfg.ladder, paths, ladder), len(ladder) - 1), "step0": 0})
    steps = [r["step"] for r in read_jsonl(paths.metrics, require={"step": int})]
    record_attempt(paths, ladder[min(max(current["rung"], 0), len(ladder) - 1)], "oom_killed",
                   error=f"SLURM: {state} (job {job_id})",
                   steps_done=max(0, (steps[-1] if steps else 0) - current["step0"]), wall_time_s=elapsed_s(job_id),
                   peak_gpu_mem_gb=None, job_id=job_id)
    close_attempt(paths)  # recorded here: the next start must not record it again as `killed`
    if resubmits_done >= cfg.ladder.max_resubmits:
        note(paths, "resubmit_refused", job_id=job_id, reason=f"ladder.max_resubmits={cfg.ladder.max_resubmits} used")
        return None, "killed for memory; no resubmissions left"
    nxt = start_rung(cfg.ladder, paths, ladder)
    if nxt >= len(ladder):
        note(paths, "resubmit_refused", job_id=job_id, reason="ladder exhausted")
        return None, "killed for memory on the last rung"
    return cfg, f"rung {nxt}"
