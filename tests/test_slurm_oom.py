"""The OOM ladder across the scheduler, on the real local cluster: a job whose host
memory exceeds its --mem is killed (OUT_OF_MEMORY); the afterany watchdog records
the attempt and resubmits at the next rung, which uses less memory and completes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from finellama_rl.fileio import read_jsonl

pytestmark = pytest.mark.slurm


def test_host_oom_kill_is_resubmitted_at_next_rung(slurm_cluster, tmp_path):
    env = {**os.environ, **slurm_cluster}
    # 500 MB held per micro-batch sequence: micro batch 4 (2 GB + the process) overflows --mem=2G;
    # rung 1 (micro batch 2, 1 GB) fits.
    args = ["experiment=smoke", f"run.results_dir={tmp_path}", "run.sweep=oom", "trainer.max_steps=3",
            "trainer.save_every=1", "hardware.slurm.mem_gb=2", "hardware.slurm.cpus_per_task=1", "debug.host_mem_mb_per_sequence=500",
            "eval.num_examples=4", "ladder.remember_fit=false"]
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.launch", *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "oom" / "grpo-tiny-cpu"
    deadline = time.time() + 420
    while time.time() < deadline and not (run / "eval_results.json").exists():
        time.sleep(3)
    attempts = read_jsonl(run / "attempts.jsonl")
    assert [(a["rung"], a["micro_batch"], a["outcome"]) for a in attempts] == [(0, 4, "oom_killed"), (1, 2, "completed")], attempts
    assert "OUT_OF_MEMORY" in attempts[0]["error"]
    assert attempts[1]["peak_host_rss_gb"] < 2.0  # the second attempt fits in --mem=2G
    ledger = read_jsonl(tmp_path / "oom" / "ledger.jsonl")
    # every job: training, its watchdog, the watchdog's resubmission and that one's watchdog
    assert [e["kind"] for e in ledger] == ["train", "watchdog", "train", "watchdog"], ledger
    assert ledger[2]["resubmission_of"] == ledger[0]["job_id"] and ledger[3]["watches"] == ledger[2]["job_id"]
    status = subprocess.run([sys.executable, "-m", "finellama_rl.status", str(tmp_path / "oom"), "--json"],
                            capture_output=True, text=True, env=env, timeout=60)
    (row,) = json.loads(status.stdout)
    assert row["job_id"] == ledger[2]["job_id"] and row["jobs"] == [e["job_id"] for e in ledger]
    state = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,State", "-j", ledger[0]["job_id"]], capture_output=True, text=True, env=env).stdout
    assert "OUT_OF_MEMORY" in state
    events = [e["event"] for e in read_jsonl(run / "logs" / "job_events.jsonl")]
    assert "resubmitted" in events
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "eval_results.json").read_text())["step"] == 3
