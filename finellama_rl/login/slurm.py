"""SLURM through submitit: the only module that imports submitit.

- `executor_params(cfg)`: the sbatch request from the hardware profile (GPUs, CPUs,
  memory, time, partition, account, QOS, constraint, extra options, signal,
  `--requeue`); stdout and stderr go to one log (`logs/submitit/<job>_0_log.out`).
- `submission_text(cfg)`: the exact script submitit will submit, rendered without
  SLURM installed (dry run, `sbatch --test-only`, tests); `test_submission` asks
  sbatch whether it would accept that very text (nothing is queued).
- `submit(cfg, argv)`: one job per run; `TrainJob` runs `python -m finellama_rl.train`
  as a child process on the compute node. On SLURM's warning signal (USR2,
  `signal_delay_s` before the time limit, or a preemption) submitit calls
  `TrainJob.checkpoint`, which forwards the signal to the child (it saves at the
  end of its step and exits 75) and returns a resubmission: submitit requeues the
  job, which resumes in the same run folder. Requeues are bounded by
  `hardware.slurm.max_requeues`. Preemption, `scontrol requeue` and scancel send
  SIGTERM to the job's process only (SIGKILL follows after KillWait): `TrainJob`
  forwards it, so the child saves at the end of its step before it is killed, and
  the job ends with one line, not a traceback.
- `record_submission`: the sweep's ledger.jsonl lists every job (training jobs,
  watchdogs, resubmissions) so that status and `--cancel` see them all.
- `job_states(job_ids)`: scheduler states from sacct, for `finellama_rl.status`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import submitit
from submitit.core.core import PicklingExecutor

from finellama_rl.config import Config, Device, RunConfig, SlurmConfig
from finellama_rl.fileio import append_jsonl
from finellama_rl.errors import EXIT_STOPPED, SubmissionFailed
from finellama_rl.ownership import LAUNCH_ID_ENV
from finellama_rl.results import RunPaths, SweepPaths



def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def _additional(s: SlurmConfig) -> Dict[str, Any]:
    """`additional` options; an empty value is a flag (`exclusive: ""` -> `--exclusive`)."""
    return {k: (True if v == "" else v) for k, v in s.additional.items()}


def sbatch_options(cfg: Config) -> Dict[str, Any]:
    """The sbatch options (long names, no leading dashes) a run requests."""
    hw, s = cfg.hardware, cfg.hardware.slurm
    opts: Dict[str, Any] = {
        "nodes": 1,
        "ntasks-per-node": 1,
        "cpus-per-task": s.cpus_per_task,
        "mem": f"{s.mem_gb}G",
        "time": s.timeout_min,
        "signal": f"USR2@{s.signal_delay_s}",
    }
    if hw.device == Device.cuda:
        opts["gpus-per-node"] = hw.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            opts[key] = getattr(s, key)
    opts.update(_additional(cfg.hardware.slurm))
    return opts


def job_name(run: RunConfig, prefix: str = "fl") -> str:
    """`fl-<sweep>-<run>`: squeue shows which sweep a job belongs to."""
    return f"{prefix}-{run.sweep}-{run.name}"[:200]


def executor_params(cfg: Config) -> Dict[str, Any]:
    """The same request in submitit's SlurmExecutor parameter names."""
    hw, s = cfg.hardware, cfg.hardware.slurm
    params: Dict[str, Any] = {
        "job_name": job_name(cfg.run),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": s.cpus_per_task,
        "mem": f"{s.mem_gb}G",
        "time": s.timeout_min,
        "signal_delay_s": s.signal_delay_s,
        "stderr_to_stdout": True,  # one log per job: warnings and progress where the table points
        "additional_parameters": {"requeue": True, **_additional(cfg.hardware.slurm)},
    }
    if hw.device == Device.cuda:
        params["gpus_per_node"] = hw.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def train_command(argv: List[str], gpus: int) -> List[str]:
    """The training process. With several GPUs it supervises one torchrun rank per GPU
    itself (finellama_rl.job.distributed: it restarts the ranks at the next OOM rung and
    passes USR2/TERM on as a stop request), so signals reach it, not torchrun."""
    return [sys.executable, "-m", "finellama_rl.train", *argv]


def job_threads(user: Optional[str], cpus: Optional[str], gpus: int) -> Optional[str]:
    """OMP_NUM_THREADS of a job's training process: the user's own (OMP_NUM_THREADS where launch
    ran; sbatch exports it), at most the CPUs the job got; else one per process on a CPU job
    (a thread per allocated CPU made steps 15x slower than one on an oversubscribed node,
    docs/LOG.md); else, on GPUs, the allocated CPUs (the supervisor of several ranks splits
    them). None: leave it unset."""
    cap = int(cpus) if cpus and cpus.isdigit() and int(cpus) > 0 else None
    if user and user.isdigit() and int(user) > 0:
        return str(min(int(user), cap) if cap else int(user))
    if gpus == 0:
        return "1"
    return str(cap) if cap else None


class TrainJob(submitit.helpers.Checkpointable):
    """What runs on the compute node: the training process, signal-aware."""

    def __init__(self, argv: List[str], run_dir: str, gpus: int, timeout_min: int, signal_delay_s: int, max_requeues: int,
                 launch_id: Optional[str] = None):
        self.argv, self.run_dir, self.gpus = list(argv), run_dir, gpus
        self.timeout_min, self.signal_delay_s, self.max_requeues = timeout_min, signal_delay_s, max_requeues
        # Kept across requeues (they rerun this pickle): a requeue never replays run.resume=false (ownership.is_replay).
        self.launch_id = launch_id or uuid.uuid4().hex
        self.proc: Optional[subprocess.Popen] = None

    def __call__(self) -> Dict[str, Any]:
        env = os.environ.copy()
        env[LAUNCH_ID_ENV] = self.launch_id
        # Save before the time limit if the next scheduled save would come too late.
        env["FINELLAMA_DEADLINE"] = str(time.time() + self.timeout_min * 60 - self.signal_delay_s)
        threads = job_threads(os.environ.get("OMP_NUM_THREADS"), os.environ.get("SLURM_CPUS_PER_TASK"), self.gpus)
        if threads:  # never more than the job's CPUs: 2 threads on 1 CPU made steps 10-70x slower
            env["OMP_NUM_THREADS"] = threads
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self._note("start", restarts=restarts)
        # stderr into the same log as stdout: the launch table points at the .out file
        self.proc = subprocess.Popen(train_command(self.argv, self.gpus), env=env, stderr=subprocess.STDOUT)
        # Preemption, `scontrol requeue` and scancel send SIGTERM to this process only (then
        # SIGKILL after KillWait); submitit just logs it. Pass it on so the child saves first.
        signal.signal(signal.SIGTERM, self._forward_sigterm)
        code = self._wait()
        self._note("exit", code=code, restarts=restarts)
        if code == EXIT_STOPPED:  # saved on SIGTERM (preemption, requeue, scancel): SLURM requeues or ends the job
            print(f"[finellama_rl job] training saved and stopped on a signal (exit {EXIT_STOPPED}); "
                  f"it resumes from its checkpoint when the job runs again: {self.run_dir}", flush=True)
            sys.exit(EXIT_STOPPED)  # SystemExit: no traceback, no result pickle
        if code is not None and code < 0:  # a signal ended training before it could save (e.g. scancel while loading)
            print(f"[finellama_rl job] training was ended by {signal.Signals(-code).name} before it saved; "
                  f"the last checkpoint in {self.run_dir} stays the resume point", flush=True)
            sys.exit(128 - code)
        if code != 0:
            raise RuntimeError(f"training exited with code {code}; see the log above and {self.run_dir}")
        results = RunPaths(Path(self.run_dir)).eval_results
        try:
            return json.loads(results.read_text())["accuracy"] if results.exists() else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _wait(self, timeout_s: Optional[float] = None) -> Optional[int]:
        # poll(), not wait(): wait() holds a lock the signal handler's own wait would deadlock on.
        end = None if timeout_s is None else time.time() + timeout_s
        while self.proc.poll() is None:
            if end is not None and time.time() > end:
                return None
            time.sleep(0.5)
        return self.proc.returncode

    def _forward_sigterm(self, signum: int, _frame: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._note("sigterm_forwarded")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        """Called by submitit on USR2: let the child save, then ask to be requeued."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR2)
            code = self._wait(timeout_s=max(5, self.signal_delay_s - 5))
            self._note("signal", code=code)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if _cancelled_meanwhile():  # scancel during the save: submitit's `scontrol requeue` would revive the job
            self._note("requeue_skipped", reason="job was cancelled")
            return None
        if restarts >= self.max_requeues:
            self._note("requeue_refused", restarts=restarts)
            return None
        self._note("requeue", restarts=restarts + 1)
        fresh = TrainJob(self.argv, self.run_dir, self.gpus, self.timeout_min, self.signal_delay_s, self.max_requeues,
                         self.launch_id)
        return submitit.helpers.DelayedSubmission(fresh)

    def _note(self, event: str, **fields: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event,
                  "job_id": os.environ.get("SLURM_JOB_ID"), **fields}
        try:
            append_jsonl(RunPaths(Path(self.run_dir)).job_events, record)
        except OSError:
            pass
        print(f"[finellama_rl job] {event} {fields}", flush=True)


def _cancelled_meanwhile() -> bool:
    """True when this job was scancelled (e.g. while the child was saving on USR2).
    While its processes are being killed scontrol says COMPLETING whatever the cause;
    the accounting record says CANCELLED at once, so ask sacct."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or shutil.which("sacct") is None:
        return False
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    lines = out.strip().splitlines()
    return bool(lines) and lines[-1].startswith("CANCELLED")


class Executor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor without its constructor's `srun` check, so that the very
    text it submits can be rendered where SLURM is not installed (a laptop, CI, the dry
    run). Submitting still calls sbatch, and the job runs srun on the compute node."""

    def __init__(self, folder: str, max_num_timeout: int = 3):
        PicklingExecutor.__init__(self, folder, max_num_timeout=max_num_timeout)
        self.python = shlex.quote(sys.executable)

    def submission_text(self) -> str:
        """The script `submit` writes (its `%j` placeholders are filled by SLURM)."""
        return self._make_submission_file_text(self._submitit_command_str, "preview")


def make_executor(cfg: Config) -> Executor:
    folder = RunPaths(Path(cfg.run.dir)).submitit_logs
    executor = Executor(folder=str(folder), max_num_timeout=cfg.hardware.slurm.max_requeues)
    executor.update_parameters(**executor_params(cfg))
    return executor


def make_job(cfg: Config, argv: List[str]) -> TrainJob:
    s = cfg.hardware.slurm
    gpus = cfg.hardware.gpus_per_node if cfg.hardware.device == Device.cuda else 0
    return TrainJob(argv, cfg.run.dir, gpus, s.timeout_min, s.signal_delay_s, s.max_requeues)


@contextlib.contextmanager
def _quiet_stderr():
    """submitit prints sbatch's stderr before raising; we report it ourselves, once."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def submit(cfg: Config, argv: List[str]) -> submitit.Job:
    try:
        with _quiet_stderr():
            return make_executor(cfg).submit(make_job(cfg, argv))
    except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as exc:
        raise SubmissionFailed(sbatch_error_line(str(exc))) from None


def sbatch_preview(cfg: Config) -> str:
    """The sbatch script submitit would write for this run (dry run); SLURM fills `%j`."""
    return make_executor(cfg).submission_text()


def sbatch_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["sbatch failed without a message"])[-1]


# sbatch's words -> the setting that asked for it
_ERROR_KEYS: List[Tuple[str, str]] = [
    (r"qos|quality of service", "hardware.slurm.qos"),  # first: "Job violates accounting/QOS policy" is a QOS limit
    (r"account", "hardware.slurm.account"),
    (r"gres|generic resource|gpu", "hardware.gpus_per_node / hardware.slurm.additional.gres"),
    (r"feature|constraint", "hardware.slurm.constraint"),
    (r"partition", "hardware.slurm.partition"),
    (r"time limit|time_limit|timelimit", "hardware.slurm.timeout_min"),
    (r"memory|\bmem\b", "hardware.slurm.mem_gb"),
    (r"cpu|processor|node configuration|tasks", "hardware.slurm.cpus_per_task / hardware.slurm.mem_gb"),
]


def sbatch_error_key(message: str) -> str:
    """The setting an sbatch error is about (best guess from its words)."""
    low = message.lower()
    for pattern, key in _ERROR_KEYS:
        if re.search(pattern, low):
            return key
    return "hardware.slurm"


def test_submission(cfg: Config) -> Optional[str]:
    """None if `sbatch --test-only` accepts this run's exact script (nothing is queued),
    else sbatch's error line."""
    text = make_executor(cfg).submission_text()
    try:
        out = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sbatch --test-only failed: {exc}"
    return None if out.returncode == 0 else sbatch_error_line(out.stderr + "\n" + out.stdout)


def record_submission(ledger: Path, cfg: Config, job_id: str, argv: List[str], kind: str = "train",
                      **extra: Any) -> None:
    """One ledger line per job: kind train (a training job, also a watchdog's
    resubmission) or watchdog (with the job it watches)."""
    append_jsonl(ledger, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "kind": kind, "run": cfg.run.name, "run_dir": cfg.run.dir,
        "job_id": str(job_id), "hardware": cfg.hardware.name, "partition": cfg.hardware.slurm.partition,
        "log": str(RunPaths(Path(cfg.run.dir)).job_log(job_id, watchdog=kind != "train")), "argv": argv, **extra,
    })


_REQUEUED = ("REQUEUED", "PREEMPTED", "NODE_FAIL", "REQUEUE_HOLD", "REQUEUE_FED")


def job_states(job_ids: List[str]) -> Dict[str, Dict[str, str]]:
    """{job_id: {state, restarts, elapsed}} from sacct (the allocation line of each job).

    sacct has no Restarts field (22.05 rejects it: "Invalid field requested"); with
    --duplicates it lists every run of a requeued job as its own line, oldest first,
    each ended by a requeue in state REQUEUED: restarts = those lines; the last line
    holds the current state. A line that did not end in a requeue belongs to an older
    job that had the same id (ids restart after the accounting is wiped). squeue's
    live state wins where slurmctld still holds the job.
    """
    if not job_ids:
        return {}
    states: Dict[str, Dict[str, str]] = {}
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[1].split():
                prev, state = states.get(parts[0]), parts[1].split()[0]
                runs = int(prev["restarts"]) if prev and prev["state"] in _REQUEUED else 0
                states[parts[0]] = {"state": state, "restarts": str(runs + (state in _REQUEUED)), "elapsed": parts[2]}
    for job_id, state in _live_states(job_ids).items():  # sacct lags, and keeps REQUEUED for a job cancelled while requeued
        states.setdefault(job_id, {"restarts": "0", "elapsed": ""})["state"] = state
    return states


def _live_states(job_ids: List[str]) -> Dict[str, str]:
    """{job_id: state} for the jobs slurmctld still holds (MinJobAge after they end)."""
    if shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60)
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def cancel(job_ids: List[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)


def submit_watchdog(cfg: Config, train_job_id: str, argv: List[str], resubmits_done: int) -> submitit.Job:
    """A 1-CPU job that runs after `train_job_id` ends and resubmits it at the next
    ladder rung if it was killed for memory (finellama_rl.login.slurm.watch)."""
    s = cfg.hardware.slurm
    executor = Executor(folder=str(RunPaths(Path(cfg.run.dir)).watch_logs), max_num_timeout=0)
    params: Dict[str, Any] = {"job_name": job_name(cfg.run, "flw"), "nodes": 1, "ntasks_per_node": 1,
                              "cpus_per_task": 1, "mem": "1G", "time": 15, "stderr_to_stdout": True,
                              "additional_parameters": {"dependency": f"afterany:{train_job_id}"}}
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    executor.update_parameters(**params)
    try:
        with _quiet_stderr():
            return executor.submit(watch, argv, cfg.run.dir, train_job_id, resubmits_done)
    except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as exc:
        raise SubmissionFailed(sbatch_error_line(str(exc))) from None


def watch(argv: List[str], run_dir: str, job_id: str, resubmits_done: int) -> str:
    """The watchdog job: runs after `job_id` ended; resubmits training (and a new
    watchdog) at the next rung if it died for memory (finellama_rl.login.resubmit)."""
    from finellama_rl.login.resubmit import decide_resubmit, note
    from finellama_rl.results import RunPaths

    argv = [a for a in argv if not a.startswith("run.resume=")] + ["run.resume=true"]  # it continues the run
    cfg, message = decide_resubmit(argv, run_dir, job_id, resubmits_done)
    if cfg is None:
        return message
    ledger = SweepPaths.of_run(Path(run_dir)).ledger
    job = submit(cfg, argv)
    record_submission(ledger, cfg, job.job_id, argv, resubmission_of=job_id)
    dog = submit_watchdog(cfg, job.job_id, argv, resubmits_done + 1)
    record_submission(ledger, cfg, dog.job_id, argv, kind="watchdog", watches=job.job_id)
    note(RunPaths(Path(run_dir)), "resubmitted", old_job=job_id, new_job=job.job_id, rung=message)
    return f"resubmitted as job {job.job_id} at {message}"
