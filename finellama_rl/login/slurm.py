"""SLURM through submitit: the only module that imports submitit.

- `executor_params(cfg)`: the sbatch request from the hardware profile (GPUs, CPUs,
  memory, time, nodes, partition, account, QOS, constraint, extra options, signal,
  `--requeue`); stdout and stderr go to one log (`logs/submitit/<job>_0_log.out`).
- `submit_units(units, folder, name)`: one job, or one job array for several units of
  the same request (submitit's `batch()`: one sbatch call, `--array=0-N%P` throttled by
  `hardware.slurm.array_parallelism`); job ids are `<array>_<task>` for array tasks.
  A unit (login/units.py) is one run, a pack of runs sharing a GPU, or one run on
  several nodes. `units_preview` renders the exact script (with its `--array` line)
  without SLURM installed (dry run, `sbatch --test-only` through `test_text`, tests).
- `TrainJob`: what runs on the compute node: the controller (login/controller.py) that
  starts each run as an srun step and retries a run killed for memory at its next rung.
  On SLURM's warning signal (USR2, `signal_delay_s` before the time limit, or a
  preemption) every step saves at the end of its training step and exits 75, and
  submitit calls `TrainJob.checkpoint`, which waits for them and asks for a requeue:
  submitit requeues this job or array task (`scontrol requeue <array>_<task>`, never
  its siblings), which resumes each run in its folder. Requeues are bounded by
  `hardware.slurm.max_requeues`. Preemption, `scontrol requeue` and scancel send
  SIGTERM: every run saves likewise, and the job ends with one line, not a traceback.
- `record_submission`: the sweep's ledger.jsonl has one line per run and job, so that
  status and `--cancel` see them all. Scheduler queries: login/scheduler.py.
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
import submitit.slurm.slurm
from submitit.core.core import PicklingExecutor

from finellama_rl.config import Config, Device, RunConfig, SlurmConfig
from finellama_rl.errors import EXIT_STOPPED, SubmissionFailed
from finellama_rl.fileio import append_jsonl
from finellama_rl.login.controller import Controller, RunStep, accuracy, note
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import job_ref, restart_count


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def _additional(s: SlurmConfig) -> Dict[str, Any]:
    """`additional` options; an empty value is a flag (`exclusive: ""` -> `--exclusive`)."""
    return {k: (True if v == "" else v) for k, v in s.additional.items()}


def sbatch_options(cfg: Config) -> Dict[str, Any]:
    """The sbatch options (long names, no leading dashes) a run requests."""
    hw, s = cfg.hardware, cfg.hardware.slurm
    opts: Dict[str, Any] = {
        "nodes": hw.nodes,
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
        "nodes": hw.nodes,
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
    if hw.nodes > 1:  # the controller runs once, on the first node; it starts one training task per node
        params["srun_args"] = ["--nodes=1", "--ntasks=1"]
    return params


class TrainJob(submitit.helpers.Checkpointable):
    """What runs on the compute node: the job's controller (login/controller.py) around one
    run, a pack of runs, or one run on several nodes, each an srun step of its own."""

    def __init__(self, runs: List[RunStep], timeout_min: int, signal_delay_s: int, max_requeues: int,
                 launch_id: Optional[str] = None):
        self.runs, self.timeout_min, self.signal_delay_s, self.max_requeues = list(runs), timeout_min, signal_delay_s, max_requeues
        # Kept across requeues (they rerun this pickle): a requeue never replays run.resume=false (ownership.is_replay).
        self.launch_id = launch_id or uuid.uuid4().hex
        self.controller: Optional[Controller] = None

    def __call__(self) -> Dict[str, Any]:
        self.controller = Controller(self.runs, time.time() + self.timeout_min * 60 - self.signal_delay_s, self.launch_id)
        # Preemption, `scontrol requeue` and scancel send SIGTERM (then SIGKILL after KillWait);
        # submitit only logs it. Pass it on so every run saves first.
        signal.signal(signal.SIGTERM, self.controller.on_sigterm)
        return self._finish(self.controller.run())

    def _finish(self, codes: Dict[str, int]) -> Dict[str, Any]:
        if any(c == EXIT_STOPPED for c in codes.values()):
            if self.controller.terminated:  # saved on SIGTERM (preemption, requeue, scancel): SLURM requeues or ends the job
                print(f"[finellama_rl job] training saved and stopped on a signal (exit {EXIT_STOPPED}); "
                      "it resumes from its checkpoint when the job runs again", flush=True)
                sys.exit(EXIT_STOPPED)  # SystemExit: no traceback, no result pickle
            # Stopped on a warning that reached the steps before this process (another node's
            # slurmd, or a user's `scancel --signal=USR2` of a step): requeue as on our own USR2.
            print("[finellama_rl job] training saved and stopped on the warning signal: requeueing", flush=True)
            os.kill(os.getpid(), signal.SIGUSR2)  # submitit's handler calls checkpoint() and requeues
            time.sleep(60)
        failed = {name: code for name, code in codes.items() if code != 0}
        if failed:
            runs = ", ".join(f"{name} (exit {code})" for name, code in failed.items())
            raise RuntimeError(f"training failed: {runs}; see the log above and the run folders")
        found = {run.name: accuracy(run) for run in self.runs}
        return found if len(self.runs) > 1 else found[self.runs[0].name]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        """Called by submitit on USR2: let every run save, then ask to be requeued."""
        # Once: a second USR2 (scancel retries "Job can not be altered now" 5 s later; measured)
        # would re-enter submitit's handler, and its requeue would cut this one's wait short.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if self.controller is not None:
            self.controller.stop_and_wait(max(5, self.signal_delay_s - 5))
        restarts = restart_count()
        if _cancelled_meanwhile():  # scancel during the save: submitit's `scontrol requeue` would revive the job
            self._note("requeue_skipped", reason="job was cancelled")
            return None
        if restarts >= self.max_requeues:
            self._note("requeue_refused", restarts=restarts)
            return None
        self._note("requeue", restarts=restarts + 1)
        fresh = TrainJob(self.runs, self.timeout_min, self.signal_delay_s, self.max_requeues, self.launch_id)
        return submitit.helpers.DelayedSubmission(fresh)

    def _note(self, event: str, **fields: Any) -> None:
        for run in self.runs:
            note(run, event, **fields)


def _cancelled_meanwhile() -> bool:
    """True when this job was scancelled (e.g. while the runs were saving on USR2).
    While its processes are being killed scontrol says COMPLETING whatever the cause;
    the accounting record says CANCELLED at once, so ask sacct (for an array task by
    `<array>_<task>`: the raw id of the last task started is the array id, and sacct
    would answer for every task)."""
    ref = job_ref()
    if not ref or shutil.which("sacct") is None:
        return False
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ref],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    lines = [line.split("|") for line in out.strip().splitlines() if line.startswith(f"{ref}|")]
    return bool(lines) and lines[-1][1].startswith("CANCELLED")


class Executor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor without its constructor's `srun` check, so that the very
    text it submits can be rendered where SLURM is not installed (a laptop, CI, the dry
    run). Submitting still calls sbatch, and the job runs srun on the compute node."""

    def __init__(self, folder: str, max_num_timeout: int = 3):
        PicklingExecutor.__init__(self, folder, max_num_timeout=max_num_timeout)
        self.python = shlex.quote(sys.executable)

    def submission_text(self, tasks: int = 1) -> str:
        """The script `submit` writes (its `%j` placeholders are filled by SLURM); with
        tasks > 1 the array script `batch()` writes (`#SBATCH --array=0-<n-1>%<P>`)."""
        params = dict(self.parameters, map_count=tasks) if tasks > 1 else self.parameters
        return submitit.slurm.slurm._make_sbatch_string(command=self._submitit_command_str, folder=self.folder, **params)


def unit_params(unit: Any, name: str, tasks: int = 1) -> Dict[str, Any]:
    """The request of one job unit (login/units.py: a run, a pack, a multi-node run) with
    the job's name; with tasks > 1, the throttle of the array it is a task of."""
    params = executor_params(unit.cfg)
    params["job_name"] = name[:200]
    s = unit.cfg.hardware.slurm
    if tasks > 1:
        params["array_parallelism"] = min(tasks, s.array_parallelism or tasks)
    return params


def request_key(cfg: Config) -> str:
    """Runs with equal keys ask for exactly the same resources: they may share an array."""
    params = {k: v for k, v in executor_params(cfg).items() if k != "job_name"}
    s = cfg.hardware.slurm
    return json.dumps([params, s.max_requeues, s.array_parallelism, s.arrays], sort_keys=True, default=str)


def make_executor(folder: Path, params: Dict[str, Any], max_requeues: int) -> Executor:
    executor = Executor(folder=str(folder), max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


def make_job(unit: Any) -> TrainJob:
    s = unit.cfg.hardware.slurm
    return TrainJob(unit.steps(), s.timeout_min, s.signal_delay_s, s.max_requeues)


@contextlib.contextmanager
def _quiet_stderr():
    """submitit prints sbatch's stderr before raising; we report it ourselves, once."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def submit_units(units: List[Any], folder: Path, name: str) -> List[str]:
    """Submit job units as one job (one unit) or one array (several: submitit's batch(),
    one sbatch call); returns the job ids, `<array>_<task>` for array tasks."""
    s = units[0].cfg.hardware.slurm
    executor = make_executor(folder, unit_params(units[0], name, len(units)), s.max_requeues)
    try:
        with _quiet_stderr():
            if len(units) == 1:
                return [str(executor.submit(make_job(units[0])).job_id)]
            with executor.batch():
                jobs = [executor.submit(make_job(u)) for u in units]
            return [str(j.job_id) for j in jobs]
    except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as exc:
        raise SubmissionFailed(sbatch_error_line(str(exc))) from None


def units_preview(units: List[Any], folder: Path, name: str) -> str:
    """The script sbatch gets for these units (dry run, `sbatch --test-only`); SLURM fills `%j`/`%A_%a`."""
    s = units[0].cfg.hardware.slurm
    return make_executor(folder, unit_params(units[0], name, len(units)), s.max_requeues).submission_text(len(units))


def sbatch_preview(cfg: Config) -> str:
    """The sbatch script submitit would write for this one run (dry run); SLURM fills `%j`."""
    from finellama_rl.results import RunPaths as _RunPaths

    params = dict(executor_params(cfg))
    return make_executor(_RunPaths(Path(cfg.run.dir)).submitit_logs, params, cfg.hardware.slurm.max_requeues).submission_text()


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
    (r"array", "hardware.slurm.arrays / hardware.slurm.array_parallelism"),
    (r"memory|\bmem\b", "hardware.slurm.mem_gb"),
    (r"cpu|processor|node configuration|tasks", "hardware.slurm.cpus_per_task / hardware.slurm.mem_gb / hardware.nodes"),
]


def sbatch_error_key(message: str) -> str:
    """The setting an sbatch error is about (best guess from its words)."""
    low = message.lower()
    for pattern, key in _ERROR_KEYS:
        if re.search(pattern, low):
            return key
    return "hardware.slurm"


def test_text(text: str) -> Optional[str]:
    """None if `sbatch --test-only` accepts this exact script (nothing is queued), else
    sbatch's error line. An array script is checked once for all its tasks (the request
    and the array's size; not per-user job limits, where every task counts)."""
    try:
        out = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sbatch --test-only failed: {exc}"
    return None if out.returncode == 0 else sbatch_error_line(out.stderr + "\n" + out.stdout)


def record_submission(ledger: Path, cfg: Config, job_id: str, argv: List[str], kind: str = "train",
                      **extra: Any) -> None:
    """One ledger line per run and job: kind train (older ledgers also hold `watchdog`
    lines, which status still reads); array tasks add `array` and `task`, packed runs
    `pack` (the names of the runs that share the job)."""
    append_jsonl(ledger, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "kind": kind, "run": cfg.run.name, "run_dir": cfg.run.dir,
        "job_id": str(job_id), "hardware": cfg.hardware.name, "partition": cfg.hardware.slurm.partition,
        "log": str(RunPaths(Path(cfg.run.dir)).job_log(job_id)), "argv": argv, **extra,
    })
