"""The controller of a training job: what runs inside the SLURM job around training (the
submitit callable of login/slurm.py calls it; no submitit here). It starts each run of
the job as an srun step of its own and waits for them:

- one run per job (the default), or several (`hardware.runs_per_gpu`: a pack sharing the
  job's GPU, CPUs and memory; each step gets its share with `--mem`, `--cpus-per-task`
  and, on CUDA, FINELLAMA_GPU_FRACTION for torch's per-process memory fraction);
- on one node, or on `hardware.nodes` nodes (one step task per node; each task is that
  node's torchrun supervisor, finellama_rl.job.distributed, with a static rendezvous on
  the first node's NodeAddr, asked from SLURM here and passed on).

Why a step per run: SLURM then kills only that step when a run goes over its memory
(state OUT_OF_MEMORY on `<job>.<step>`, named after the run), and the job lives on. The
controller records the attempt and starts the run again at the next rung of its OOM
ladder, in the same allocation (no resubmission, no queue wait, no watchdog job), at
most `ladder.max_resubmits` times (login/resubmit.py). An OOM in one run of a pack
steps down that run only. A run that fails for another reason is given up (noted in its
job_events.jsonl; a requeued job does not start it again); the others go on.

Signals: SLURM's warning (USR2, `signal_delay_s` before the time limit) reaches every
step, so every run saves at the end of its step and exits 75; the controller then asks
to be requeued (login/slurm.py), and the requeued job resumes each run where it
stopped (runs that had finished are not started again). SIGTERM (preemption,
`scontrol requeue`, scancel) is passed on to every step likewise.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from finellama_rl.errors import EXIT_STOPPED
from finellama_rl.fileio import append_jsonl, read_jsonl
from finellama_rl.ownership import LAUNCH_ID_ENV
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import job_ref, restart_count

CONTROLLER_MEM_MB = 256  # the job's memory the controller keeps for itself (its steps get the rest)


@dataclass
class RunStep:
    """One run of a job, as the controller starts it (built at launch, pickled with the job)."""

    name: str  # the run's name: the step's --job-name, so that sacct finds its step
    run_dir: str
    argv: List[str]  # overrides for `python -m finellama_rl.train`
    cpus: int  # CPUs of the step (and its threads)
    mem_mb: int  # --mem of the step (per node)
    nodes: int = 1
    gpu_fraction: Optional[float] = None  # CUDA packs: torch.cuda.set_per_process_memory_fraction
    cuda: bool = True  # a GPU run (threads: job_threads)
    own_log: bool = False  # packs: the step writes <run>/logs/submitit/<job>_0_log.out; else the job's log

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run_dir))


def note(run: RunStep, event: str, **fields: Any) -> None:
    """A line in the run's logs/job_events.jsonl (and the job log)."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, "job_id": job_ref(), **fields}
    try:
        append_jsonl(run.paths.job_events, record)
    except OSError:
        pass
    print(f"[finellama_rl job] {run.name}: {event} {fields}", flush=True)


def job_threads(user: Optional[str], cpus: Optional[str], gpus: int) -> Optional[str]:
    """OMP_NUM_THREADS of a run's training process: the user's own (OMP_NUM_THREADS where launch
    ran; sbatch exports it), at most the CPUs its step got; else one per process on a CPU job
    (a thread per allocated CPU made steps 15x slower than one on an oversubscribed node,
    docs/LOG.md); else, on GPUs, the step's CPUs (the supervisor of several ranks splits
    them). None: leave it unset."""
    cap = int(cpus) if cpus and cpus.isdigit() and int(cpus) > 0 else None
    if user and user.isdigit() and int(user) > 0:
        return str(min(int(user), cap) if cap else int(user))
    if gpus == 0:
        return "1"
    return str(cap) if cap else None


def in_slurm_job() -> bool:
    return job_ref() is not None and shutil.which("srun") is not None


def step_command(run: RunStep, log: Optional[Path]) -> List[str]:
    """`srun ... python -m finellama_rl.train <argv>`: a step of its own, sharing the job's
    resources with the controller's step (--overlap), named after the run."""
    train = [sys.executable, "-m", "finellama_rl.train", *run.argv]
    if not in_slurm_job():
        return train
    cmd = ["srun", "--overlap", f"--job-name={run.name}", f"--nodes={run.nodes}", f"--ntasks={run.nodes}",
           "--ntasks-per-node=1", f"--cpus-per-task={run.cpus}", f"--mem={run.mem_mb}M"]
    if run.nodes > 1:
        cmd.append("--label")  # which node said it
    if log is not None:
        cmd += [f"--output={log}", "--open-mode=append"]
    return [*cmd, *train]


def master_address() -> str:
    """The first node's address for torchrun's static rendezvous: its NodeAddr from
    scontrol (node names need not resolve), else the address srun was launched from."""
    from finellama_rl.login import scheduler

    first = scheduler.first_node(os.environ.get("SLURM_JOB_NODELIST", ""))
    return (first and scheduler.node_addr(first)) or os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"


def rendezvous_port(starts: int) -> int:
    """A port for this job's rendezvous, the same on every node, new for each start of the
    step (a restarted step must not wait for the previous one's socket to close)."""
    raw = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    return 20000 + (raw * 7 + restart_count() * 1009 + starts * 101) % 20000


class Controller:
    """Starts the job's runs as srun steps, restarts a run killed for memory at its next
    rung, forwards signals; `run()` returns {run name: exit code}."""

    def __init__(self, runs: List[RunStep], deadline: float, launch_id: Optional[str] = None):
        self.runs, self.deadline, self.launch_id = runs, deadline, launch_id
        self.procs: Dict[str, subprocess.Popen] = {}
        self.codes: Dict[str, int] = {}
        self.starts: Dict[str, int] = {}
        self.started_at: Dict[str, float] = {}
        self.log_offset: Dict[str, int] = {}
        self.stopping = False  # a signal asked every run to save and stop: restart nothing
        self.terminated = False  # SIGTERM (preemption, scontrol requeue, scancel)
        self.forwarded: set = set()  # (pid, signal) already passed on

    # ------------------------------------------------------------------ starting
    def pending(self) -> List[RunStep]:
        """The runs this run of the job still has to train: not finished or given up in this job."""
        ref = job_ref()
        left = []
        for run in self.runs:
            ended = [e for e in read_jsonl(run.paths.job_events, require={"event": str}, quiet=True)
                     if e.get("job_id") == ref and (e["event"] == "gave_up" or (e["event"] == "run_exit" and e.get("code") == 0))]
            if ended:
                self.codes[run.name] = 0 if ended[-1]["event"] == "run_exit" else int(ended[-1].get("code", 1))
            else:
                left.append(run)
        return left

    def log_of(self, run: RunStep) -> Path:
        ref = job_ref()
        return run.paths.job_log(ref) if ref else run.paths.logs / "train.out"

    def env_for(self, run: RunStep) -> Dict[str, str]:
        env = os.environ.copy()
        env["FINELLAMA_DEADLINE"] = str(self.deadline)  # save before the time limit if the next save would come too late
        if self.launch_id:  # a requeue or an OOM restart of this job never replays run.resume=false (ownership.is_replay)
            env[LAUNCH_ID_ENV] = self.launch_id
        # never more than the step's CPUs (2 threads on 1 CPU made steps 10-70x slower); a step has >= 1
        env["OMP_NUM_THREADS"] = job_threads(os.environ.get("OMP_NUM_THREADS"), str(run.cpus), 1 if run.cuda else 0)
        if run.gpu_fraction is not None:
            env["FINELLAMA_GPU_FRACTION"] = f"{run.gpu_fraction:.4f}"
        if run.nodes > 1:
            env["FINELLAMA_NODES"] = str(run.nodes)
            env["FINELLAMA_MASTER_ADDR"] = master_address()
            env["FINELLAMA_MASTER_PORT"] = str(rendezvous_port(self.starts.get(run.name, 0)))
        return env

    def start(self, run: RunStep) -> None:
        log = self.log_of(run)
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.log_offset[run.name] = log.stat().st_size
        except OSError:
            self.log_offset[run.name] = 0
        cmd = step_command(run, log if run.own_log else None)
        # stderr into the same log as stdout: the launch table points at the .out file
        self.procs[run.name] = subprocess.Popen(cmd, env=self.env_for(run), stderr=subprocess.STDOUT)
        self.starts[run.name] = self.starts.get(run.name, 0) + 1
        self.started_at[run.name] = time.time()
        note(run, "start", restarts=restart_count(), step_start=self.starts[run.name])
        if self.stopping:  # a signal came between the decision to start and the step being known to forward()
            self.forward(signal.SIGTERM if self.terminated else signal.SIGUSR2)

    # ------------------------------------------------------------------ waiting
    def run(self) -> Dict[str, int]:
        for run in self.pending():
            self.start(run)
        while self.procs:
            time.sleep(0.5)  # poll, not wait(): the signal handlers must be able to run
            for run in self.runs:
                proc = self.procs.get(run.name)
                if proc is None or proc.poll() is None:
                    continue
                del self.procs[run.name]
                self.ended(run, proc.returncode)
        return dict(self.codes)

    def ended(self, run: RunStep, code: int) -> None:
        self.codes[run.name] = code
        if code not in (0, EXIT_STOPPED) and not self.stopping and self.retry_after_oom(run, code) \
                and not self.stopping:  # a signal during the decision (sacct can take seconds): the requeue restarts it
            self.start(run)
            return
        note(run, "run_exit", code=code, restarts=restart_count())
        if code not in (0, EXIT_STOPPED) and not self.stopping:
            note(run, "gave_up", code=code)  # a requeued job does not start it again

    def retry_after_oom(self, run: RunStep, code: int) -> bool:
        """The run's step ended for memory (SLURM says OUT_OF_MEMORY, or the log's new lines
        end with an out-of-memory error it could not catch): record the attempt; True when a
        rung and a restart are left (login/resubmit.py decides)."""
        from finellama_rl.login import resubmit, scheduler

        ref = job_ref()
        state = scheduler.last_step_state(ref, run.name) if in_slurm_job() and ref else None
        oom = state == "OUT_OF_MEMORY"
        if not oom and code == 1 and resubmit.log_says_oom(self.log_of(run), self.log_offset.get(run.name, 0)):
            oom, state = True, "FAILED with an uncaught out-of-memory error"
        if not oom:
            return False
        wall = round(time.time() - self.started_at.get(run.name, time.time()), 1)
        retry, message = resubmit.record_oom_kill(run.argv, run.run_dir, str(ref), state, wall)
        note(run, "oom_retry" if retry else "oom_given_up", state=state, decision=message)
        return retry

    # ------------------------------------------------------------------ signals
    def forward(self, sig: int) -> None:
        """Pass a signal on to every run still training (srun passes it to the tasks), once
        per signal and step: a process that has saved and is exiting may no longer handle it."""
        for run in self.runs:
            proc = self.procs.get(run.name)
            if proc is not None and proc.poll() is None and (proc.pid, sig) not in self.forwarded:
                self.forwarded.add((proc.pid, sig))
                proc.send_signal(sig)
                note(run, "sigterm_forwarded" if sig == signal.SIGTERM else "signal_forwarded", signal=signal.Signals(sig).name)

    def on_sigterm(self, signum: int, _frame: Any) -> None:
        self.stopping = self.terminated = True
        self.forward(signal.SIGTERM)

    def stop_and_wait(self, timeout_s: float) -> Dict[str, Optional[int]]:
        """USR2: every run saves at the end of its step and exits; wait for them (bounded)."""
        self.stopping = True
        self.forward(signal.SIGUSR2)
        end = time.time() + timeout_s
        while any(p.poll() is None for p in self.procs.values()) and time.time() < end:
            time.sleep(0.5)
        for run in self.runs:
            proc = self.procs.get(run.name)
            if proc is not None and proc.poll() is not None:
                del self.procs[run.name]
                self.codes[run.name] = proc.returncode
                note(run, "signal", code=proc.returncode)
        return {run.name: self.codes.get(run.name) for run in self.runs}


def accuracy(run: RunStep) -> Dict[str, Any]:
    """The final accuracy of a finished run ({} when unreadable)."""
    try:
        return json.loads(run.paths.eval_results.read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
