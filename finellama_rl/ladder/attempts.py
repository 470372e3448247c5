"""attempts.jsonl: one line per attempt of the OOM ladder (with the phase an
out-of-memory happened in), the rung an attempt starts at, and the marker of the attempt
in progress (a hard-killed attempt is recorded when the run starts again).

Written by the job (job/oom_loop.py, the in-process ladder) and by the job's
controller (login/resubmit.py, the scheduler-level ladder); read by status and report. The ladder of
a config is in ladder/run_ladder.py, the fit memory in ladder/fitmem.py, the phase tracker
and fault injection in job/faults.py. No torch at import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from finellama_rl.config import LadderConfig
from finellama_rl.ladder.rungs import Phase, Rung, fit_generation_batch, step_down
from finellama_rl.results import RunPaths
from finellama_rl.fileio import append_jsonl, read_jsonl

OOM_OUTCOMES = ("oom", "oom_killed")


ATTEMPT_RECORD = {"rung": int, "outcome": str}


def _rung_check(record: Dict[str, Any]):
    return (record, None) if record["rung"] >= 0 else (None, f"rung {record['rung']} is negative")


def read_attempts(paths: RunPaths) -> List[Dict[str, Any]]:
    """Valid attempt records (malformed lines, and a negative rung, are skipped with one warning)."""
    return read_jsonl(paths.attempts, require=ATTEMPT_RECORD, check=_rung_check)


def record_attempt(paths: RunPaths, rung: Rung, outcome: str, **fields: Any) -> Dict[str, Any]:
    s = rung.setting
    record = {"attempt": len(read_attempts(paths)) + 1, "rung": rung.index, "micro_batch": s.micro_batch,
              "grad_accum": s.grad_accum, "generation_batch": s.generation_batch,
              "max_prompt_tokens": s.max_prompt_tokens, "max_completion_tokens": s.max_completion_tokens,
              "activation_checkpointing": s.activation_checkpointing,
              "changes_experiment": rung.changes_experiment, "outcome": outcome, **fields}
    append_jsonl(paths.attempts, record)
    return record


def _rung_of_record(ladder: List[Rung], record: Dict[str, Any]) -> Rung:
    """The rung an attempt ran at: its list rung with the generation batch it used."""
    rung = ladder[min(int(record["rung"]), len(ladder) - 1)]
    gen = record.get("generation_batch")
    if not gen or not rung.setting.generation_batch or gen == rung.setting.generation_batch:
        return rung
    setting = fit_generation_batch(rung.setting, gen)
    return Rung(rung.index, setting, rung.changes_experiment, f"generation_batch {setting.generation_batch}")


def start_point(lad: LadderConfig, paths: RunPaths, ladder: List[Rung]) -> Optional[Rung]:
    """The rung this attempt starts at: the configured (planned) one, or after an
    out-of-memory the one step_down chooses for the phase that ran out (the whole
    list's next rung when the phase is unknown, e.g. killed by the scheduler), or the
    last attempt's rung. None: every rung has run out of memory."""
    configured = ladder[min(lad.start_rung, len(ladder) - 1)]
    attempts = read_attempts(paths)
    if not attempts:
        return configured
    last = attempts[-1]
    rung = _rung_of_record(ladder, last)
    if last["outcome"] in OOM_OUTCOMES:
        rung = step_down(ladder, rung, last.get("phase") or Phase.other)
        if rung is None:
            return None
    return configured if configured.index > rung.index else rung


def start_rung(lad: LadderConfig, paths: RunPaths, ladder: List[Rung]) -> int:
    """The list index of start_point (len(ladder) when the ladder is exhausted)."""
    rung = start_point(lad, paths, ladder)
    return len(ladder) if rung is None else rung.index


def format_attempts(attempts: List[Dict[str, Any]]) -> str:
    lines = ["attempt rung micro x accum   gen prompt/completion ckpt outcome      phase       steps  error"]
    for a in attempts:
        lines.append(f"{a['attempt']:>7} {a['rung']:>4} {a['micro_batch']:>5} x {a['grad_accum']:<5} "
                     f"{a.get('generation_batch') or '-':>5} "
                     f"{a['max_prompt_tokens']:>6}/{a['max_completion_tokens']:<10} {str(a['activation_checkpointing'])[0]:>4} "
                     f"{a['outcome']:<12} {a.get('phase') or '-':<11} {a.get('steps_done', '?'):>5}  "
                     f"{str(a.get('error', ''))[:60]}")
    return "\n".join(lines)


# ------------------------------------------------- attempts that never recorded their end


def open_attempt(paths: RunPaths, rung: int, step0: int, started: float) -> None:
    """Mark an attempt as running: if the process is killed before it records its end
    (SIGKILL, node failure, the scheduler's OOM kill), the job's controller or the next start
    records it from this marker."""
    from finellama_rl.fileio import atomic_write_json
    from finellama_rl.slurm_env import job_ref

    atomic_write_json(paths.current_attempt, {"rung": rung, "step0": step0, "started": started,
                                              "job_id": job_ref(), "closed": False})


def close_attempt(paths: RunPaths) -> None:
    from finellama_rl.fileio import atomic_write_json, read_json_object

    marker = read_json_object(paths.current_attempt, quiet=True)
    if marker is not None and marker.get("closed") is False:
        atomic_write_json(paths.current_attempt, {**marker, "closed": True})


def unclosed_attempt(paths: RunPaths) -> Optional[Dict[str, Any]]:
    """The marker of an attempt that never recorded its end, or None."""
    from finellama_rl.fileio import read_json_object

    marker = read_json_object(paths.current_attempt, "the attempt marker", require={"rung": int, "step0": int})
    return marker if marker is not None and marker.get("closed") is False else None


def record_unclosed_attempt(paths: RunPaths, ladder: List[Rung], last_step: int) -> Optional[Dict[str, Any]]:
    """At start: an earlier attempt that was hard-killed goes into attempts.jsonl as `killed`."""
    import time

    marker = unclosed_attempt(paths)
    if marker is None:
        return None
    rung = ladder[min(max(marker["rung"], 0), len(ladder) - 1)]
    started = marker.get("started")
    wall = round(time.time() - started, 2) if isinstance(started, (int, float)) and not isinstance(started, bool) else None
    record = record_attempt(paths, rung, "killed", error="the process ended without recording its end (SIGKILL, "
                            "node failure or the scheduler's kill after a signal)",
                            steps_done=max(0, last_step - marker["step0"]), wall_time_s=wall, peak_gpu_mem_gb=None,
                            job_id=marker.get("job_id"))
    close_attempt(paths)
    return record
