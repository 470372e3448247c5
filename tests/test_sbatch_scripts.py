"""slurm/*.sbatch stay generated from conf/hardware and request what launch requests;
on the real cluster a script's USR2 trap saves, requeues and resumes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from finellama_rl.compose import load_config
from finellama_rl.sbatch_scripts import SLURM_DIR, profiles, render_sbatch
from finellama_rl.slurm import sbatch_preview

RESOURCE_KEYS = ("cpus-per-task", "mem", "time", "gpus-per-node", "partition", "constraint", "nodes", "ntasks-per-node")


def sbatch_lines(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", text, flags=re.M))


def test_every_profile_has_a_script():
    assert profiles() == sorted(p.stem for p in SLURM_DIR.glob("*.sbatch"))


@pytest.mark.parametrize("profile", profiles())
def test_script_is_up_to_date(profile):
    cfg = load_config([f"hardware={profile}"], resolve_paths=False)
    assert (SLURM_DIR / f"{profile}.sbatch").read_text() == render_sbatch(cfg), \
        "regenerate with: python -m finellama_rl.sbatch_scripts"


@pytest.mark.parametrize("profile", profiles())
def test_script_requests_what_launch_requests(profile, tmp_path):
    script = sbatch_lines((SLURM_DIR / f"{profile}.sbatch").read_text())
    launch = sbatch_lines(sbatch_preview(load_config([f"hardware={profile}", f"run.dir={tmp_path}"])))
    for key in RESOURCE_KEYS:
        assert script.get(key) == launch.get(key), key
    assert script["signal"] == "B:" + launch["signal"]  # same signal and delay; the batch shell forwards it
    subprocess.run(["bash", "-n", str(SLURM_DIR / f"{profile}.sbatch")], check=True)


def _sacct_state(job_id: str) -> str:
    # -D lists every run of a requeued job (sacct 22.05 has no Restarts field); last line = now.
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.slurm
def test_sbatch_script_saves_requeues_and_resumes_on_usr2(slurm_cluster, tmp_path):
    env = {**os.environ, **slurm_cluster, "FINELLAMA_PYTHON": sys.executable}
    args = ["experiment=smoke", "trainer.max_steps=40", "trainer.save_every=20", "eval.num_examples=4",
            f"run.dir={tmp_path / 'run'}", "hardware.slurm.mem_gb=4", "hardware.slurm.cpus_per_task=1"]
    out = subprocess.run(["sbatch", "--parsable", "--mem=4G", "--cpus-per-task=1", str(SLURM_DIR / "cpu.sbatch"), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    job = out.stdout.strip().split(";")[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(1)
    assert metrics.exists(), f"job {job} never started training: {_sacct_state(job)}"
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, env=env)
    while time.time() < deadline + 240 and not (tmp_path / "run" / "eval_results.json").exists():
        time.sleep(2)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "USR2: asking training to save" in log and "requeueing (restart 1" in log, log[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41)), "every step trained exactly once, the counter never goes back"
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 40
    deadline = time.time() + 60  # accounting lags the job's end by a few seconds
    while time.time() < deadline and not _sacct_state(job).endswith("COMPLETED"):
        time.sleep(2)
    assert _sacct_state(job).splitlines() == ["REQUEUED", "COMPLETED"]
