"""One writer per run folder: `<run>/run.lock` names the process that trains it.

Why: two jobs training one folder (a relaunch of a queued sweep, two launches in
the same second) interleave metrics.jsonl and overwrite each other's checkpoints.
`finellama_rl.train` takes the lock for the whole run (every rung of the OOM
ladder) and releases it when it exits; `finellama_rl.launch` refuses to submit
into a folder whose lock is live (and, from the ledger, whose job is pending or
running).

The lock file holds its holder as JSON: host, pid, the pid's start time, SLURM
job id, start time and command. It is created with an exclusive hard link (atomic
on NFS too). A lock is stale when its holder is gone:
- it names a SLURM job: the scheduler (squeue) says that job is no longer pending
  or running, or it is this very job (an earlier run of a requeued job);
- otherwise, on this host: the pid is dead or now belongs to another process.
A holder on another host without a job id (or when squeue cannot answer) counts as
live; the message names it and the file to remove once you are sure.

    with RunLock(run_dir): ...train...        # RunFolderBusy (exit 2) when held
    busy_reason(run_dir) -> None | "held by job 123 (RUNNING) on node1 since ..."
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from finellama_rl.errors import ConfigError
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import job_ref

ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")
SchedulerFn = Callable[[str], Optional[str]]  # job id -> its state, "" when unknown to SLURM, None when SLURM cannot say


class RunFolderBusy(ConfigError):
    """Another job or process trains this run folder."""

    def __init__(self, run_dir: Path, why: str, hint: str = ""):
        super().__init__("run.dir", f"{run_dir} is in use: {why}. {hint}".strip())
        self.run_dir, self.why = Path(run_dir), why


@dataclass
class Holder:
    host: str
    pid: int
    pid_start: Optional[str]
    job_id: Optional[str]
    started: str
    command: str

    def describe(self) -> str:
        who = f"job {self.job_id}, " if self.job_id else ""
        return f"{who}pid {self.pid} on {self.host} since {self.started}"


def proc_start_time(pid: int) -> Optional[str]:
    """The start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def this_holder(job_scoped: bool = True) -> Holder:
    """This process as a lock holder; `job_scoped` false leaves out the SLURM job id (a
    launch's reservation belongs to its process, not to the allocation it may run in)."""
    return Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=proc_start_time(os.getpid()),
                  job_id=job_ref() if job_scoped else None,
                  started=_dt.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv)[:300])


def read_holder(path: Path) -> Tuple[Optional[Holder], str]:
    """(holder, "") from a lock file; (None, "") when there is none; (None, why) when it is unreadable."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
        return Holder(host=str(data["host"]), pid=int(data["pid"]), pid_start=data.get("pid_start"),
                      job_id=str(data["job_id"]) if data.get("job_id") else None, started=str(data.get("started", "?")),
                      command=str(data.get("command", ""))), ""
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable lock file ({type(exc).__name__})"


def squeue_state(job_id: str) -> Optional[str]:
    """The job's state from squeue; "" when SLURM does not know it (ended long ago); None
    when SLURM cannot be asked (no squeue, controller down)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "" if "invalid job id" in out.stderr.lower() else None
    return (out.stdout.split() or [""])[0]


def active_jobs(job_ids: List[str]) -> Dict[str, str]:
    """{job id: state} for the jobs that are pending, running or requeued (squeue; one
    call for all). {} without squeue. An id squeue rejects counts as ended. Array tasks
    are named `<array>_<task>` (slurm_env.job_ref); `-r` lists each pending task on a line
    of its own (without it squeue folds them into `<array>_[2-5%2]`)."""
    ids = sorted(set(job_ids))
    if not ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 and len(ids) > 1:  # one unknown id can fail the whole query: ask one by one
        return {j: s for j in ids if (s := squeue_state(j) or "") in ACTIVE_STATES}
    states = dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    return {j: s for j, s in states.items() if s in ACTIVE_STATES}


def holder_alive(h: Holder, scheduler: SchedulerFn = squeue_state) -> Tuple[bool, str]:
    """(alive, why) for the holder of a lock."""
    me = this_holder()
    if h.job_id and h.job_id != me.job_id:
        state = scheduler(h.job_id)
        if state is not None:
            return state in ACTIVE_STATES, f"job {h.job_id} is {state or 'no longer known to SLURM'}"
    if h.host == me.host:
        start = proc_start_time(h.pid)
        alive = start is not None and start == h.pid_start
        return alive, f"pid {h.pid} {'is running' if alive else 'is gone'} on {h.host}"
    if h.job_id and h.job_id == me.job_id:
        return False, f"an earlier run of this job ({h.job_id}) on {h.host}"
    return True, f"held on host {h.host}, which cannot be checked from {me.host}"


def busy_reason(run_dir: Path, scheduler: SchedulerFn = squeue_state) -> Optional[str]:
    """Why the run folder is in use (its lock is live), or None."""
    path = RunPaths(Path(run_dir)).lock
    holder, problem = read_holder(path)
    if problem:
        return f"{problem}: {path}; remove it if no job trains this folder"
    if holder is None:
        return None
    alive, why = holder_alive(holder, scheduler)
    return f"locked by {holder.describe()} ({why})" if alive else None


class RunLock:
    """Exclusive lock on a run folder for one process (`with RunLock(dir):`). `path` names
    another lock file of the folder (launch's reservation, RunPaths.launch_lock), held by
    this process whatever SLURM job it runs in."""

    def __init__(self, run_dir: Path, scheduler: SchedulerFn = squeue_state, path: Optional[Path] = None):
        self.run_dir, self.scheduler = Path(run_dir), scheduler
        self.path = Path(path) if path is not None else RunPaths(Path(run_dir)).lock
        self.job_scoped = path is None
        self.content: Optional[bytes] = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        content = (json.dumps(asdict(this_holder(self.job_scoped))) + "\n").encode()
        for _ in range(5):
            if self._create(content):
                self.content = content
                return self
            holder, problem = read_holder(self.path)
            if problem:
                raise RunFolderBusy(self.run_dir, f"{problem} ({self.path})",
                                    f"If no job or process trains it, remove {self.path} and start again.")
            if holder is None:
                continue  # released meanwhile
            alive, why = holder_alive(holder, self.scheduler)
            if alive:
                raise RunFolderBusy(self.run_dir, f"locked by {holder.describe()} ({why})", busy_hint(self.run_dir, holder.job_id))
            self._break_stale(holder)
        raise RunFolderBusy(self.run_dir, "the lock changed hands repeatedly", "Another process is starting here; try again.")

    def _create(self, content: bytes) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(content)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break_stale(self, stale: Holder) -> None:
        """Move the stale lock aside; if someone replaced it meanwhile, put theirs back."""
        aside = self.path.with_name(f".{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved, _ = read_holder(aside)
        if moved != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.content is not None:
            try:
                if self.path.read_bytes() == self.content:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self.content = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def busy_hint(run_dir: Path, job_id: Optional[str]) -> str:
    sweep = Path(run_dir).parent
    stop = (f"to stop it: python -m finellama_rl.status {sweep} --cancel (or scancel {job_id})" if job_id
            else "to stop it, end that process")
    return (f"To resume this run, wait until it ends and launch the same command again (same run.sweep); {stop}; "
            "or choose another run.sweep/run.name for a new run.")
