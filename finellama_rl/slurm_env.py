"""What a process learns about its SLURM job from the environment: the job reference that
names it to scontrol/scancel/squeue/sacct, its restart count, and its place among the
nodes of a multi-node run. Shared ground: runlock, attempts, the job controller
(login/controller.py) and the rank supervisor (job/distributed.py) all ask here.

    job_ref()   # "123" for a plain job, "120_3" for task 3 of array 120

Why `job_ref` and never SLURM_JOB_ID: an array task's own SLURM_JOB_ID is a raw id, and
for the task that starts last it equals the array id. `scontrol requeue <array id>`
requeues every task of the array, `scancel <raw id>` of another task does nothing and
exits 0, and `squeue/sacct -j <array id>` answer for every task (measured on SLURM 22.05,
docs/LOG.md, issue 22). `<array id>_<task>` names exactly one task everywhere.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def job_ref(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """`<array id>_<task id>` inside an array task, else SLURM_JOB_ID; None outside SLURM."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def restart_count(env: Optional[Mapping[str, str]] = None) -> int:
    """How often SLURM has requeued this job (or array task): SLURM_RESTART_COUNT."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def array_of(ref: str) -> Optional[str]:
    """The array id of a task reference (`120_3` -> `120`), None for a plain job id."""
    head, sep, tail = str(ref).partition("_")
    return head if sep and tail else None
