"""What the SLURM scheduler says, through its commands (squeue, sacct, scancel, scontrol):
job and array-task states for status and cancel, the state of one srun step of a job (the
in-job OOM check), the first node's address (multi-node rendezvous) and MaxArraySize.
No submitit here (login/slurm.py is its only importer); every function works for plain
job ids and for array tasks named `<array>_<task>` (finellama_rl.slurm_env.job_ref).

Facts this module leans on (SLURM 22.05, measured for issue 22, docs/LOG.md):
- squeue folds the pending tasks of an array into one line (`12_[2-5%2]`) unless `-r`.
- sacct has no line for an array task that has not started, none ever for one cancelled
  while pending, and none for the first second or two of a task that has just started:
  a state missing from both tools is unknown, not ended.
- sacct names steps `<job>.<step>` (`12_3.1`) with the step's --job-name; step numbers
  change between runs of a requeued job, so a step is found by name.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from finellama_rl.slurm_env import array_of

REQUEUED = ("REQUEUED", "PREEMPTED", "NODE_FAIL", "REQUEUE_HOLD", "REQUEUE_FED")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def _run(cmd: List[str], timeout: float = 60) -> Optional[subprocess.CompletedProcess]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def job_states(job_ids: List[str]) -> Dict[str, Dict[str, str]]:
    """{job_id: {state, restarts, elapsed}} from sacct (the allocation line of each job or
    array task), with squeue's live state where slurmctld still holds the job.

    sacct has no Restarts field (22.05 rejects it: "Invalid field requested"); with
    --duplicates it lists every run of a requeued job as its own line, oldest first,
    each ended by a requeue in state REQUEUED: restarts = those lines; the last line
    holds the current state. A line that did not end in a requeue belongs to an older
    job that had the same id (ids restart after the accounting is wiped). An id that
    neither tool knows (an array task cancelled while pending) is left out.
    """
    if not job_ids:
        return {}
    states: Dict[str, Dict[str, str]] = {}
    out = _run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)])
    for line in (out.stdout if out else "").splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[1].split() and parts[0] in job_ids:
            prev, state = states.get(parts[0]), parts[1].split()[0]
            runs = int(prev["restarts"]) if prev and prev["state"] in REQUEUED else 0
            states[parts[0]] = {"state": state, "restarts": str(runs + (state in REQUEUED)), "elapsed": parts[2]}
    for job_id, state in live_states(job_ids).items():  # sacct lags, and keeps REQUEUED for a job cancelled while requeued
        states.setdefault(job_id, {"restarts": "0", "elapsed": ""})["state"] = state
    return states


def live_states(job_ids: List[str]) -> Dict[str, str]:
    """{job_id: state} for the jobs and array tasks slurmctld still holds (MinJobAge after
    they end). Arrays are asked for by their array id with -r (one line per task)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    asked = sorted({array_of(j) or j for j in ids})
    lines: Dict[str, str] = {}
    # one id slurmctld forgot fails the whole query: then ask for each on its own
    for query in ([asked] if len(asked) == 1 else [asked, *[[a] for a in asked]]):
        out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(query)])
        if out is None:
            return {}
        lines.update(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
        if out.returncode == 0 and query is asked:
            break
    return {j: lines[j] for j in ids if j in lines}


def cancel(job_ids: List[str]) -> None:
    """scancel these jobs or array tasks (a task `<array>_<task>` alone; never a raw id)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)


def job_steps(ref: str) -> List[Tuple[str, str, str]]:
    """(step id, step name, state) of every step of this run of a job, in sacct's order."""
    out = _run(["sacct", "-n", "-P", "-o", "JobID,JobName,State", "-j", ref])
    steps = []
    for line in (out.stdout if out else "").splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and re.fullmatch(rf"{re.escape(ref)}\.\d+", parts[0]):
            steps.append((parts[0], parts[1], (parts[2].split() or ["UNKNOWN"])[0]))
    return steps


def last_step_state(ref: str, name: str, wait_s: float = 60.0, poll_s: float = 2.0) -> Optional[str]:
    """The final state of the newest step of job `ref` named `name` (sacct), waiting up
    to `wait_s` while accounting has no line for it yet or still says it runs; None when
    SLURM cannot say (no sacct, or no such step in time)."""
    deadline = time.time() + wait_s
    while True:
        named = [(int(s.rsplit(".", 1)[1]), state) for s, n, state in job_steps(ref) if n == name]
        if named:
            state = max(named)[1]
            if state in ENDED or time.time() >= deadline:
                return state
        elif shutil.which("sacct") is None or time.time() >= deadline:
            return None
        time.sleep(poll_s)


def node_addr(node: str) -> Optional[str]:
    """NodeAddr of a node (`scontrol show node`): node names need not resolve (the local
    two-node cluster's do not), the address SLURM reaches the node at does."""
    out = _run(["scontrol", "show", "node", "-o", node], timeout=30)
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out and out.returncode == 0 else None
    return found.group(1) if found else None


def first_node(nodelist: str) -> Optional[str]:
    """The first host of a SLURM node list (`vm-[1-2]` -> `vm-1`), by `scontrol show hostnames`."""
    out = _run(["scontrol", "show", "hostnames", nodelist], timeout=30)
    names = out.stdout.split() if out and out.returncode == 0 else []
    return names[0] if names else None


def max_array_size(default: int = 1001) -> int:
    """MaxArraySize of the cluster (task indices run 0..MaxArraySize-1)."""
    out = _run(["scontrol", "show", "config"], timeout=30)
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.M) if out and out.returncode == 0 else None
    return int(found.group(1)) if found else default
