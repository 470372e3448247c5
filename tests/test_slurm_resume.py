"""Starting over and launching twice, against the real local cluster (issue 19):
`run.resume=false` on an existing run under a 2-minute limit (the job's own submitit files
stay in place, the requeue resumes instead of starting over again; on a fresh folder it is
test_slurm.py's time-limit job), and two launches of one run started together (one job, the
other exits 2).

    pytest -m slurm tests/test_slurm_resume.py -s

Helpers and settings are test_slurm.py's (FAST_GRPO: about 0.1-0.3 s per step on one CPU).
The long job is submitted first (module fixture); the simultaneous launches are tried
while they run, and the long tests wait for them last.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
from test_slurm import (COMMON, FAST_GRPO, REPO, TIME_LIMIT, assert_every_step_once, events, job_logs, metric_steps,
                        run_module, time_limit_overrides, timing, wait_terminal)

from finellama_rl.fileio import read_jsonl

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def env(slurm_cluster):
    import os

    return {**os.environ, **slurm_cluster}


def launch(env: Dict[str, str], results: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = run_module("finellama_rl.launch", [*COMMON, f"run.results_dir={results}", *overrides], env)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def ledger(sweep: Path, kind: str = "train"):
    return [e for e in read_jsonl(sweep / "ledger.jsonl") if e.get("kind", "train") == kind]


# --- run.resume=false under a 2-minute limit -------------------------------------------------------
@dataclass
class FreshStarts:
    env: Dict[str, str]
    existing: Path  # the sweep whose finished run was started over


@pytest.fixture(scope="module")
def fresh_starts(env, tmp_path_factory):
    """A finished 8-step run; once it is done, the same run started over with
    run.resume=false under a 2-minute limit (test_slurm.TIME_LIMIT: steps that one
    allocation cannot finish). (A fresh folder with run.resume=false under a 2-minute limit is
    test_slurm.py's time-limit job.)"""
    root = tmp_path_factory.mktemp("fresh")
    existing = root / f"existing-{uuid.uuid4().hex[:8]}"
    launch(env, root, f"run.sweep={existing.name}", *FAST_GRPO, "trainer.max_steps=8", "hardware.slurm.timeout_min=10")
    (first,) = ledger(existing)
    wait_terminal([str(first["job_id"])], 600, [Path(first["run_dir"])])  # the folder is free
    limit = [*time_limit_overrides(), "run.resume=false"]
    launch(env, root, f"run.sweep={existing.name}", *limit)
    return FreshStarts(env, existing)


# --- two launches started together (while the jobs above run: only the submissions are timed) ---------
def test_two_launches_started_together_submit_one_job(fresh_starts, tmp_path):
    env = fresh_starts.env
    sweep = f"twice-{uuid.uuid4().hex[:8]}"
    args = [*COMMON, f"run.results_dir={tmp_path}", f"run.sweep={sweep}", *FAST_GRPO, "trainer.max_steps=2",
            "hardware.slurm.timeout_min=10"]
    procs = [subprocess.Popen([sys.executable, "-m", "finellama_rl.launch", *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    (loser,) = [err.strip() for p, (_, err) in zip(procs, outs) if p.returncode == 2]
    assert len(loser.splitlines()) == 1 and "Traceback" not in loser, loser
    assert "being launched by another command" in loser or "is in use" in loser, loser
    (train,) = ledger(tmp_path / sweep)
    try:
        named = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i", "-n", f"fl-{sweep}-grpo-tiny-cpu"],
                               capture_output=True, text=True, env=env).stdout.split()
        assert named == [str(train["job_id"])], named  # one training job in the queue, not two
        assert not (tmp_path / sweep / "grpo-tiny-cpu" / "launch.lock").exists()  # released after submitting
    finally:  # the one job is ours; it need not train to show that only one was submitted
        subprocess.run(["scancel", str(train["job_id"])], env=env, timeout=60)


# --- the two run.resume=false jobs, waited for last ------------------------------------------------
def finish(sweep: Path) -> Path:
    """Wait for the sweep's last training job: COMPLETED, every step once."""
    train = ledger(sweep)[-1]
    run = Path(train["run_dir"])
    t0 = time.time()
    final = wait_terminal([str(train["job_id"])], 1500, [run])
    timing(f"run.resume=false job {train['job_id']} to COMPLETED", time.time() - t0)
    assert final[str(train["job_id"])]["state"] == "COMPLETED", job_logs(run)
    requeues = [e for e in events(run, "requeue") if e.get("job_id") == str(train["job_id"])]
    assert requeues, f"never signalled: {TIME_LIMIT['steps']} steps fit in one allocation\n{job_logs(run)}"
    assert_every_step_once(run, TIME_LIMIT["steps"])
    assert (run / "eval_results.json").exists() and not read_jsonl(run / "metrics_discarded.jsonl")
    assert "FileNotFoundError" not in job_logs(run, tail=0)
    (start,) = json.loads((run / ".finellama_run").read_text())["fresh_starts"]  # once, not again on each requeue
    assert start["launch_id"]
    return run


def test_resume_false_on_an_existing_run_completes_every_step_once_under_a_2_minute_limit(fresh_starts):
    run = finish(fresh_starts.existing)
    (aside,) = [p for p in run.parent.iterdir() if p.name.startswith(f"{run.name}-previous-")]
    assert metric_steps(aside) == list(range(1, 9))  # the earlier run, moved aside whole
    first_job = str(ledger(fresh_starts.existing)[0]["job_id"])
    assert list((run / "logs" / "submitit").glob(f"{first_job}_0_log.out")), "submitit's folder must stay in place"
