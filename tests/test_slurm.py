"""SLURM end to end against the real local cluster (tests/slurm_cluster.py): a sweep
submitted by `finellama_rl.launch`, a time limit survived by checkpoint + requeue, a
preemption (`scontrol requeue`), bad input that submits nothing, status and cancel,
and the dry run.

    pytest -m slurm tests/test_slurm.py -s      # -s shows the measured timings

The node has 2 CPUs; every job asks for one so two run at once. The jobs that take
long (preemption, sweep, time limit) are submitted early and waited for later: tests
run in file order and share the module-scoped `jobs`. Timings are printed as
`TIMING ...` lines.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from finellama_rl.checkpoint import latest_checkpoint
from finellama_rl.fileio import read_jsonl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
COMMON = ["launcher=slurm", "experiment=smoke", "hardware.slurm.cpus_per_task=1", "hardware.slurm.mem_gb=3"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
# GRPO with 4 completions per step (smoke has 32): about 0.1-0.3 s/step on one CPU.
FAST_GRPO = ["trainer=grpo", "trainer.prompts_per_step=1", "trainer.num_generations=4", "trainer.micro_batch=4",
             "eval.num_examples=8", "eval.before_training=false"]
PREEMPT = {"max_steps": 60, "save_every": 10}  # preempted once past step save_every + 2
# Each step sleeps step_sleep_s (debug.step_sleep_s) besides its 0.1-0.3 s of training: 72 steps
# take over two minutes whatever the machine's load (the USR2 warning comes 70-100 s into an
# allocation), so the first allocation cannot finish them and the second can, using little CPU.
TIME_LIMIT = {"timeout_min": 2, "signal_delay_s": 20, "max_requeues": 6, "steps": 72, "step_sleep_s": 1.5}


def time_limit_overrides() -> List[str]:
    """A GRPO run that one 2-minute allocation cannot finish (TIME_LIMIT)."""
    t = TIME_LIMIT
    return [*FAST_GRPO, f"trainer.max_steps={t['steps']}", f"trainer.save_every={t['steps'] // 8}",
            f"debug.step_sleep_s={t['step_sleep_s']}", f"hardware.slurm.timeout_min={t['timeout_min']}",
            f"hardware.slurm.signal_delay_s={t['signal_delay_s']}", f"hardware.slurm.max_requeues={t['max_requeues']}"]


def timing(what: str, seconds: float) -> None:
    print(f"TIMING {what}: {seconds:.1f} s", flush=True)


def run_module(module: str, args: List[str], env: Dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Submitted:
    """One `finellama_rl.launch` submission and what it left behind."""
    sweep: Path
    ledger: List[dict]
    stdout: str
    seconds: float

    @property
    def trains(self) -> List[dict]:
        return [e for e in self.ledger if e.get("kind", "train") == "train"]

    @property
    def job_ids(self) -> List[str]:
        """The training jobs (older ledgers also listed each run's watchdog)."""
        return [str(e["job_id"]) for e in self.trains]

    @property
    def watchdog_ids(self) -> List[str]:
        return [str(e["job_id"]) for e in self.ledger if e.get("kind") == "watchdog"]

    @property
    def run_dir(self) -> Path:
        return Path(self.ledger[0]["run_dir"])


def submit(env: Dict[str, str], results: Path, *overrides: str) -> Submitted:
    t0 = time.time()
    proc = run_module("finellama_rl.launch", [*COMMON, f"run.results_dir={results}", *overrides], env)
    seconds = time.time() - t0
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    (sweep,) = [p for p in results.iterdir() if p.is_dir()]
    return Submitted(sweep, read_jsonl(sweep / "ledger.jsonl"), proc.stdout, seconds)


def states(job_ids: List[str]) -> Dict[str, Dict[str, str]]:
    from finellama_rl.login.scheduler import job_states

    return job_states(job_ids)


def job_logs(run_dir: Path, tail: int = 25) -> str:
    """Every submitit log of a run (the last `tail` lines of each; 0: all)."""
    parts = []
    for f in sorted((run_dir / "logs" / "submitit").glob("*_log.*")):
        parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-tail:]))
    return "\n".join(parts)


def wait_for(what: str, predicate, timeout_s: float, interval_s: float = 1.0, describe=lambda: ""):
    end = time.time() + timeout_s
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{describe()}")


def wait_terminal(job_ids: List[str], timeout_s: float, run_dirs: List[Path]) -> Dict[str, Dict[str, str]]:
    def done():
        now = states(job_ids)
        return now if all(now.get(j, {}).get("state") in TERMINAL for j in job_ids) else None

    return wait_for(f"jobs {job_ids} to end", done, timeout_s, interval_s=2.0,
                    describe=lambda: f"{states(job_ids)}\n" + "\n".join(job_logs(d) for d in run_dirs))


def metric_steps(run_dir: Path) -> List[int]:
    return [int(r["step"]) for r in read_jsonl(run_dir / "metrics.jsonl")]


def events(run_dir: Path, kind: Optional[str] = None) -> List[dict]:
    found = read_jsonl(run_dir / "logs" / "job_events.jsonl")
    return [e for e in found if kind is None or e.get("event") == kind]


def assert_every_step_once(run_dir: Path, max_steps: int) -> None:
    steps = metric_steps(run_dir)
    assert steps == list(range(1, max_steps + 1)), f"metrics.jsonl steps: {steps}"


def sacct_runs(job_id: str) -> List[List[str]]:
    """[state, start, end] of every run of a job (requeues included), oldest first."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", "State,Start,End", "-j", job_id],
                         capture_output=True, text=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Jobs:
    """The long jobs of this module, submitted early so that they overlap."""
    env: Dict[str, str]
    root: Path
    preempt: Submitted
    sweep: Submitted
    _time_limit: Optional[Submitted] = None

    def time_limit(self) -> Submitted:
        """The time-limit job, started with run.resume=false on a fresh folder (issue 19: the
        requeues must resume, not start over)."""
        if self._time_limit is None:
            self._time_limit = submit(self.env, self.root / "time_limit", *time_limit_overrides(), "run.resume=false")
        return self._time_limit


@pytest.fixture(scope="module")
def env(slurm_cluster):
    import os

    return {**os.environ, **slurm_cluster}


@pytest.fixture(scope="module")
def jobs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    preempt = submit(env, root / "preempt", *FAST_GRPO, f"trainer.max_steps={PREEMPT['max_steps']}",
                     f"trainer.save_every={PREEMPT['save_every']}", "hardware.slurm.timeout_min=10")
    sweep = submit(env, root / "sweep", "-m", "trainer=ppo,grpo", "trainer.max_steps=2", "hardware.slurm.timeout_min=10")
    jobs = Jobs(env, root, preempt, sweep)
    jobs.time_limit()  # the longest: started first
    return jobs


# --- one writer per run folder ----------------------------------------------------------------
def test_relaunch_into_a_running_sweep_is_refused(jobs):
    """The same command with the same run.sweep while its job runs: exit 2, nothing submitted;
    the running job goes on and trains every step once (checked by the preemption test)."""
    run = jobs.preempt.run_dir
    wait_for("the preemption job to train", lambda: len(metric_steps(run)) >= 2, 600, describe=lambda: job_logs(run))
    proc = run_module("finellama_rl.launch", [*COMMON, f"run.results_dir={jobs.root / 'preempt'}",
                                              f"run.sweep={jobs.preempt.sweep.name}", *FAST_GRPO,
                                              f"trainer.max_steps={PREEMPT['max_steps']}",
                                              f"trainer.save_every={PREEMPT['save_every']}", "hardware.slurm.timeout_min=10"],
                      jobs.env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{run} is in use" in message, message
    assert "wait until it ends and launch the same command again" in message and "--cancel" in message
    assert read_jsonl(jobs.preempt.sweep / "ledger.jsonl") == jobs.preempt.ledger  # nothing submitted


# --- c: preemption ---------------------------------------------------------------------------
def test_preempted_job_resumes_and_loses_at_most_the_steps_since_its_checkpoint(jobs):
    run, (job_id,) = jobs.preempt.run_dir, jobs.preempt.job_ids
    t0 = time.time()
    past = PREEMPT["save_every"] + 2
    wait_for(f"step {past} (past the first checkpoint)", lambda: max(metric_steps(run), default=0) >= past
             and latest_checkpoint(run / "checkpoints") is not None, 600, interval_s=0.3, describe=lambda: job_logs(run))
    step_at_requeue = max(metric_steps(run))
    subprocess.run(["scontrol", "requeue", job_id], check=True, env=jobs.env, timeout=30)
    jobs.time_limit()  # started by the fixture already
    final = wait_terminal([job_id], 900, [run])[job_id]
    timing("preemption test (to past first checkpoint, requeue, finish)", time.time() - t0)

    assert final["state"] == "COMPLETED", job_logs(run)
    assert int(final["restarts"]) >= 1
    assert [e["restarts"] for e in events(run, "start")][:2] == [0, 1]  # SLURM_RESTART_COUNT seen by the rerun
    assert events(run, "sigterm_forwarded"), "the training process was not told of the preemption"
    resumed = re.findall(r"resuming from step (\d+)", job_logs(run, tail=0))
    assert resumed and int(resumed[0]) < PREEMPT["max_steps"], f"the rerun did not resume mid-training: {resumed}"
    assert_every_step_once(run, PREEMPT["max_steps"])
    discarded = read_jsonl(run / "metrics_discarded.jsonl")
    assert len(discarded) <= PREEMPT["save_every"], discarded
    assert (run / "eval_results.json").exists()
    sacct = sacct_runs(job_id)
    if len(sacct) >= 2:
        timing("preemption requeue delay (end of run 1 -> start of run 2)", ts(sacct[1][1]) - ts(sacct[0][2]))
    print(f"preempted at step {step_at_requeue}, resumed from step {resumed[0]}, discarded {len(discarded)} records")


# --- d: bad input submits nothing -------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["hardware.slurm.partition=nope"], ["hardware.slurm.partition", "'nope'", "debug", "cpu", "[in run 0"]),
    (["trainer.max_stepz=3"], ["trainer.max_stepz", "Did you mean trainer.max_steps", "[in run 0"]),
    (["model=qwen2.5-0.5b"], ["Qwen2.5-0.5B", "finellama_rl.prefetch", "model.path", "[in run 0"]),
])
def test_bad_input_submits_nothing_and_exits_2(env, tmp_path, overrides, expected):
    name = f"bad-{uuid.uuid4().hex[:8]}"
    empty_home = tmp_path / "hf_home"
    empty_home.mkdir()
    bad_env = {**env, "HF_HOME": str(empty_home), "HF_HUB_OFFLINE": "1"}
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    proc = run_module("finellama_rl.launch", [*COMMON, f"run.results_dir={tmp_path / 'results'}", f"run.name={name}",
                                              f"run.sweep={name}", *overrides], bad_env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert not list(tmp_path.rglob("ledger.jsonl")) and not list(tmp_path.rglob("submitit"))
    assert_no_job_named(env, f"fl-{name}-", start)


def assert_no_job_named(env: Dict[str, str], prefix: str, start: str) -> None:
    """No job whose name starts with `prefix` is queued or was ever accounted since `start`."""
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, env=env).stdout
    known = subprocess.run(["sacct", "-n", "-X", "-P", "-S", start, "-o", "JobName%200"], capture_output=True, text=True,
                           env=env).stdout
    names = [n.strip() for n in queued.splitlines() + known.splitlines()]
    assert not [n for n in names if n.startswith(prefix)], f"a job was submitted: {names}"


def test_sweep_whose_third_run_asks_for_an_unknown_gres_submits_nothing(env, tmp_path):
    """All or nothing: sbatch --test-only checks every run before the first is submitted."""
    sweep = f"gres-{uuid.uuid4().hex[:8]}"
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    proc = run_module("finellama_rl.launch", [*COMMON, "-m", "+hardware.slurm.additional.gres=none,gpu:0,tpu:1",
                                              f"run.results_dir={tmp_path / 'results'}", f"run.sweep={sweep}"], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert "sbatch --test-only refused run 2 (" in message and "gres=tpu" in message, message
    assert "hardware.slurm.additional.gres" in message and "Invalid generic resource" in message, message
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert_no_job_named(env, f"fl-{sweep}-", start)


@pytest.mark.parametrize("sweep_args, refused, cancelled", [
    # one job per run: the third is refused, the two before it are cancelled
    (["trainer.seed=1,2,3", "hardware.slurm.arrays=false"], "sbatch refused run 2 (", 2),
    # two requests, two arrays: the second array is refused, every task of the first is cancelled
    (["trainer.seed=1,2", "hardware.slurm.mem_gb=2,3"], "sbatch refused the array of run 1 (", 2),
])
def test_a_submission_that_fails_midway_is_rolled_back(env, tmp_path, sweep_args, refused, cancelled):
    """sbatch accepts the checks, then refuses the last submission: every job and array task
    already submitted is cancelled, their files and folders removed, exit 2."""
    fail_at = 3 if "hardware.slurm.arrays=false" in sweep_args else 2
    real = shutil.which("sbatch", path=env["PATH"])
    count = tmp_path / "count"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
case " $* " in *" --test-only "*) exec {real} "$@";; esac
n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}
if [ $n -eq {fail_at} ]; then
  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit)" >&2; exit 1
fi
{real} "$@" | tee -a {tmp_path / "submitted"}
""")
    fake.chmod(0o755)
    sweep = f"midway-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    proc = run_module("finellama_rl.launch", [*COMMON, "-m", *sweep_args, "hardware.slurm.timeout_min=5",
                                              f"run.results_dir={results}", f"run.sweep={sweep}"],
                      {**env, "PATH": f"{fake.parent}:{env['PATH']}"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert refused in message and "hardware.slurm.qos" in message, message
    assert f"cancelled the {fail_at - 1} job(s) and array(s)" in message, message
    assert count.read_text().strip() == str(fail_at)
    assert not (results / sweep).exists(), sorted(str(p) for p in results.rglob("*"))
    ids = re.findall(r"Submitted batch job (\d+)", (tmp_path / "submitted").read_text())
    assert len(ids) == fail_at - 1
    tasks = ids if fail_at == 3 else [f"{ids[0]}_{t}" for t in range(2)]  # the first array's tasks
    final = wait_terminal(tasks, 60, [])  # squeue's word first, sacct's after (accounting lags)
    assert len(tasks) == cancelled and all(final[j]["state"] == "CANCELLED" for j in tasks), final


def test_auto_with_slurm_not_answering_refuses_a_gpu_profile(env, tmp_path):
    conf = Path(env["SLURM_CONF"]).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=1", conf))
    t0 = time.time()
    proc = run_module("finellama_rl.launch", ["hardware=a100_80", f"run.results_dir={tmp_path / 'r'}"],
                      {**env, "SLURM_CONF": str(dead)})
    timing("launcher=auto with SLURM not answering", time.time() - t0)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sbatch is installed but SLURM does not answer" in proc.stderr and "hardware=a100_80" in proc.stderr
    assert not (tmp_path / "r").exists()


# --- f: dry run --------------------------------------------------------------------------------
def test_dry_run_prints_the_sbatch_request_and_submits_nothing(env, tmp_path):
    name = f"dry-{uuid.uuid4().hex[:8]}"
    proc = run_module("finellama_rl.launch", ["experiment=smoke", "dry_run=true", "launcher=slurm",
                                              f"run.results_dir={tmp_path}", f"run.name={name}", "run.sweep=dry"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --mem=6G", "#SBATCH --time=60", "#SBATCH --signal=USR2@30", "#SBATCH --cpus-per-task=2",
                 f"#SBATCH --job-name=fl-dry-{name}", "#SBATCH --requeue"):
        assert line in out, f"{line!r} not in:\n{out}"
    assert "python -m finellama_rl.train" in out and "nothing submitted" in out
    assert "sbatch --test-only accepts all 1 job script(s)" in out
    assert not list(tmp_path.rglob("ledger.jsonl"))
    queued = subprocess.run(["squeue", "-h", "-n", f"fl-dry-{name}", "-o", "%i"], capture_output=True, text=True, env=env)
    assert queued.stdout.strip() == ""


# --- a: a sweep --------------------------------------------------------------------------------
def test_sweep_submits_one_array_whose_two_tasks_complete(jobs):
    sweep = jobs.sweep
    timing("launch of the two-run sweep (returns after submitting)", sweep.seconds)
    assert sweep.seconds < 60
    assert "run" in sweep.stdout and "job" in sweep.stdout and "status: python -m finellama_rl.status" in sweep.stdout
    assert len(sweep.trains) == 2 and not sweep.watchdog_ids  # every run is in the ledger; no watchdog jobs
    assert sorted(sweep.job_ids) == [f"{sweep.trains[0]['array']}_{t}" for t in (0, 1)]  # one array, two tasks
    assert {e["run"] for e in sweep.trains} == {"ppo-tiny-cpu", "grpo-tiny-cpu"}
    for e in sweep.trains:
        assert re.search(rf"^{e['run']}\s+{e['job_id']}\s", sweep.stdout, re.M), sweep.stdout
    names = subprocess.run(["squeue", "-h", "-o", "%j", "-j", ",".join(sweep.job_ids)], capture_output=True, text=True,
                           env=jobs.env).stdout.split()
    assert all(n.startswith(f"fl-{sweep.sweep.name}-") for n in names), names  # job names show the sweep
    t0 = time.time()
    final = wait_terminal(sweep.job_ids, 900, [Path(e["run_dir"]) for e in sweep.trains])
    timing("waiting for the sweep to end (after the preemption test)", time.time() - t0)
    for e in sweep.trains:
        assert final[str(e["job_id"])]["state"] == "COMPLETED", job_logs(Path(e["run_dir"]))
        assert (Path(e["run_dir"]) / "eval_results.json").exists()
        assert_every_step_once(Path(e["run_dir"]), 2)


# --- e: status and cancel ------------------------------------------------------------------------
def test_status_shows_the_finished_sweep(jobs):
    wait_terminal(jobs.sweep.job_ids, 900, [])
    proc = run_module("finellama_rl.status", [str(jobs.sweep.sweep)], jobs.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: by)?", header)]  # column starts ("scored by" is one column)
    names = [header[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    for e in jobs.sweep.trains:
        accuracy = json.loads((Path(e["run_dir"]) / "eval_results.json").read_text())["accuracy"]
        row = rows[e["run"]]
        assert [row[k] for k in ("job", "state", "requeues", "step")] == [str(e["job_id"]), "COMPLETED", "0", "2/2"], row
        assert (row["strict"], row["lenient"]) == (f"{accuracy['strict']:.1%}", f"{accuracy['lenient']:.1%}"), row
    as_json = json.loads(run_module("finellama_rl.status", [str(jobs.sweep.sweep), "--json"], jobs.env).stdout)
    assert {r["run"]: r["state"] for r in as_json} == {"ppo-tiny-cpu": "COMPLETED", "grpo-tiny-cpu": "COMPLETED"}


def test_cancel_ends_a_long_job_cancelled(jobs, tmp_path):
    long = submit(jobs.env, tmp_path, "trainer=ppo", "trainer.max_steps=100000", "hardware.slurm.timeout_min=10")
    (job_id,) = long.job_ids
    t0 = time.time()
    try:  # cancel it running if a CPU frees up soon, else while it waits
        wait_for("the long job to start", lambda: states([job_id]).get(job_id, {}).get("state") == "RUNNING", 45)
    except pytest.fail.Exception:
        pass
    proc = run_module("finellama_rl.status", [str(long.sweep), "--cancel"], jobs.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"cancelled 1 job(s): {long.ledger[0]['run']} (job {job_id}," in proc.stdout, proc.stdout
    final = wait_terminal([job_id], 60, [long.run_dir])
    timing("cancel test", time.time() - t0)
    assert final[job_id]["state"] == "CANCELLED", final
    again = run_module("finellama_rl.status", [str(long.sweep), "--cancel"], jobs.env, timeout=60)
    assert "cancelled 0 job(s)" in again.stdout and "CANCELLED" in again.stdout


# --- b: time limit -------------------------------------------------------------------------------
def test_time_limit_checkpoints_requeues_and_trains_every_step_once(jobs):
    sub = jobs.time_limit()
    run, (job_id,) = sub.run_dir, sub.job_ids
    t0 = time.time()
    final = wait_terminal([job_id], 1200, [run])[job_id]
    timing("waiting for the time-limit job (after the tests before it)", time.time() - t0)

    assert final["state"] == "COMPLETED", job_logs(run)
    requeues = events(run, "requeue")
    assert requeues, f"never signalled: the machine trained {TIME_LIMIT['steps']} steps in one allocation\n{job_logs(run)}"
    assert int(final["restarts"]) >= len(requeues) >= 1
    assert [e["restarts"] for e in events(run, "start")] == list(range(len(requeues) + 1))
    assert events(run, "signal")[0]["code"] == 75, events(run)  # saved mid-training and stopped in time
    assert (run / "eval_results.json").exists()
    assert_every_step_once(run, TIME_LIMIT["steps"])
    assert not read_jsonl(run / "metrics_discarded.jsonl"), "a signalled run lost steps"
    # run.resume=false on a fresh folder: started over once, never again on a requeue; nothing moved aside,
    # submitit's own files left where they were (issue 19: the job ended FAILED on its missing pickles)
    (start,) = json.loads((run / ".finellama_run").read_text())["fresh_starts"]
    assert start["launch_id"] and not [p for p in run.parent.iterdir() if "-previous-" in p.name]
    assert "FileNotFoundError" not in job_logs(run, tail=0)
    report_time_limit_timings(job_id, run)


def report_time_limit_timings(job_id: str, run: Path) -> None:
    runs = sacct_runs(job_id)
    out = "".join(f.read_text(errors="replace") for f in sorted((run / "logs" / "submitit").glob("*_log.out")))
    signals = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\) - Caught signal SIGUSR2", out)
    limit = TIME_LIMIT["timeout_min"] * 60
    for i, (state, start, end) in enumerate(runs):
        if i < len(signals):
            at = ts(signals[i].replace(" ", "T")) - ts(start)
            timing(f"time limit run {i}: USR2 after (nominal {limit - TIME_LIMIT['signal_delay_s']} s, early by "
                   f"{limit - TIME_LIMIT['signal_delay_s'] - at:.0f} s)", at)
        if i + 1 < len(runs):
            timing(f"time limit requeue delay {i} -> {i + 1}", ts(runs[i + 1][1]) - ts(end))
    timing(f"time-limit job from first start to COMPLETED ({len(runs)} allocations)", ts(runs[-1][2]) - ts(runs[0][1]))
