"""slurm/*.sbatch stay generated from conf/hardware and request what launch requests;
launch's submission text renders without SLURM installed; on the real cluster a
script's USR2 trap saves, requeues and resumes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from finellama_rl.compose import load_config
from finellama_rl.sbatch_scripts import SLURM_DIR, profiles, render_sbatch
from finellama_rl.login.slurm import executor_params, sbatch_preview

RESOURCE_KEYS = ("cpus-per-task", "mem", "time", "gpus-per-node", "partition", "constraint", "nodes", "ntasks-per-node")


def sbatch_lines(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", text, flags=re.M))


@pytest.fixture
def no_slurm_path(tmp_path, monkeypatch):
    """PATH without any SLURM binary, as on a machine where SLURM was never installed."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("srun") is None and shutil.which("sbatch") is None


def test_every_profile_has_a_script():
    assert profiles() == sorted(p.stem for p in SLURM_DIR.glob("*.sbatch"))


@pytest.mark.parametrize("profile", profiles())
def test_script_is_up_to_date(profile):
    cfg = load_config([f"hardware={profile}"], resolve_paths=False)
    assert (SLURM_DIR / f"{profile}.sbatch").read_text() == render_sbatch(cfg), \
        "regenerate with: python -m finellama_rl.sbatch_scripts"


@pytest.mark.parametrize("profile", profiles())
def test_script_requests_what_launch_requests(profile, tmp_path, no_slurm_path):
    script = sbatch_lines((SLURM_DIR / f"{profile}.sbatch").read_text())
    cfg = load_config([f"hardware={profile}", f"run.results_dir={tmp_path}", "run.sweep=s"])
    launch_text = sbatch_preview(cfg)  # rendered with no srun/sbatch on PATH
    launch = sbatch_lines(launch_text)
    for key in RESOURCE_KEYS:
        assert script.get(key) == launch.get(key), key
    assert script["signal"] == "B:" + launch["signal"]  # same signal and delay; the batch shell forwards it
    assert "#SBATCH --requeue" in launch_text and "#SBATCH --requeue" in (SLURM_DIR / f"{profile}.sbatch").read_text()
    bash = shutil.which("bash", path="/bin:/usr/bin")
    subprocess.run([bash, "-n", str(SLURM_DIR / f"{profile}.sbatch")], check=True)


def test_preview_is_the_submitted_text(tmp_path, no_slurm_path):
    """The dry run's text is what submitit writes: same executor class, same parameters."""
    cfg = load_config(["experiment=smoke", f"run.results_dir={tmp_path}", "run.sweep=s1", "run.name=r1"])
    text = sbatch_preview(cfg)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --job-name=fl-s1-r1" in lines
    assert f"#SBATCH --output={tmp_path}/s1/r1/logs/submitit/%j_%t_log.out".replace("%t", "0") in lines
    assert not any(line.startswith("#SBATCH --error") for line in lines)  # one log: stderr goes to .out
    assert "#SBATCH --mem=6G" in lines and "#SBATCH --signal=USR2@30" in lines
    command = lines[lines.index("# command") + 2]
    assert command.startswith("srun --unbuffered --output") and "submitit.core._submit" in command
    assert executor_params(cfg)["stderr_to_stdout"] is True


def script_threads(profile: str, env: dict) -> str:
    """OMP_NUM_THREADS that a profile's script exports, run by bash with `env` (the job's variables)."""
    text = render_sbatch(load_config([f"hardware={profile}"], resolve_paths=False))
    lines = [l for l in text.splitlines() if l.startswith(("THREADS=", "if [ -n \"${SLURM_CPUS_PER_TASK", "export OMP_NUM_THREADS"))]
    assert len(lines) == 3, lines
    out = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$OMP_NUM_THREADS"'], env={"PATH": os.environ["PATH"], **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("profile, user, cpus, expected", [
    ("cpu", None, "16", "1"),        # a CPU job: one thread unless you say otherwise (oversubscribed nodes)
    ("cpu", "4", "16", "4"),         # yours
    ("cpu", "32", "2", "2"),         # never more than the job's CPUs
    ("a100_80", None, "16", "16"),   # a GPU job: its CPUs
    ("a100_80", "4", "16", "4"),
    ("a100_80", "64", "16", "16"),
])
def test_threads_per_process_in_scripts_and_jobs_agree(profile, user, cpus, expected):
    from finellama_rl.job.distributed import rank_threads
    from finellama_rl.login.controller import job_threads

    env = {"SLURM_CPUS_PER_TASK": cpus, **({"OMP_NUM_THREADS": user} if user else {})}
    assert script_threads(profile, env) == expected
    gpus = load_config([f"hardware={profile}"], resolve_paths=False).hardware.gpus_per_node if profile != "cpu" else 0
    assert job_threads(user, cpus, gpus) == expected  # launch's jobs (login/controller.Controller)
    assert rank_threads(None, 2, cuda=False) == "1" and rank_threads("8", 2, cuda=True) == "4"  # the ranks' share


def test_a100_80_takes_a_per_gpu_share_not_the_node():
    cfg = load_config(["hardware=a100_80"], resolve_paths=False)
    assert cfg.hardware.gpus_per_node == 1 and cfg.hardware.slurm.mem_gb == 120
    whole = load_config(["hardware=a100_80", "hardware.slurm.mem_gb=480", '+hardware.slurm.additional.exclusive=""'],
                        resolve_paths=False)
    assert "#SBATCH --exclusive\n" in render_sbatch(whole) and "#SBATCH --mem=480G" in render_sbatch(whole)


def _sacct_state(job_id: str) -> str:
    # -D lists every run of a requeued job (sacct 22.05 has no Restarts field); last line = now.
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.slurm
def test_sbatch_script_saves_requeues_and_resumes_on_usr2(slurm_cluster, tmp_path):
    env = {**os.environ, **slurm_cluster, "FINELLAMA_PYTHON": sys.executable}
    args = ["experiment=smoke", "trainer.max_steps=40", "trainer.save_every=20", "eval.num_examples=4",
            f"run.results_dir={tmp_path}", f"run.dir={tmp_path / 'run'}", "hardware.slurm.mem_gb=4",
            "hardware.slurm.cpus_per_task=1"]
    out = subprocess.run(["sbatch", "--parsable", "--mem=4G", "--cpus-per-task=1", str(SLURM_DIR / "cpu.sbatch"), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    job = out.stdout.strip().split(";")[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(1)
    assert metrics.exists(), f"job {job} never started training: {_sacct_state(job)}"
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, env=env)
    while time.time() < deadline + 300 and not (tmp_path / "run" / "eval_results.json").exists():
        time.sleep(2)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "USR2: asking training to save" in log and "requeueing (restart 1" in log, log[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41)), "every step trained exactly once, the counter never goes back"
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 40
    deadline = time.time() + 90  # accounting lags the job's end by a few seconds
    while time.time() < deadline and not _sacct_state(job).endswith("COMPLETED"):
        time.sleep(2)
    assert _sacct_state(job).splitlines() == ["REQUEUED", "COMPLETED"]
