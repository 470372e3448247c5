"""finellama_rl.train's hold on its run folder, without loading a model (the attempt is
stubbed): one writer (run.lock), a stale `.staging` cleared before anything else is
written, a hard-killed attempt recorded, a full disk said in one line, fit memory only
from real runs, run.resume=false moving only the run's own files."""
from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fill_until_full

from finellama_rl import train
from finellama_rl.trainers import run as training_run
from finellama_rl.fileio import read_jsonl
from finellama_rl.ownership import claim
from finellama_rl.runlock import RunFolderBusy, proc_start_time
from finellama_rl.results import RunPaths


@pytest.fixture
def attempts_stubbed(monkeypatch):
    """train_attempt replaced by a scripted one: each call pops a result (an exit code or an exception)."""
    script = []

    def fake_attempt(cfg, paths, *rest):
        assert paths.lock.exists(), "training runs while holding the run folder's lock"
        outcome = script.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(training_run, "train_attempt", fake_attempt)
    monkeypatch.setattr(training_run, "free_memory", lambda: None)
    return script


@pytest.fixture
def fit_memory(tmp_path, monkeypatch):
    path = tmp_path / "fit_memory.json"
    monkeypatch.setenv("FINELLAMA_FIT_MEMORY", str(path))
    return path


def oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_lock_is_held_during_the_run_and_released_after(make_config, attempts_stubbed, fit_memory):
    cfg = make_config("experiment=smoke")
    attempts_stubbed.append(0)
    assert training_run.run_training(cfg) == 0
    assert not RunPaths(Path(cfg.run.dir)).lock.exists()
    attempts_stubbed.append(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        training_run.run_training(cfg)
    assert not RunPaths(Path(cfg.run.dir)).lock.exists()  # released on errors too


def test_fit_memory_from_a_real_oom_step_down_but_not_from_fault_injection(make_config, attempts_stubbed, fit_memory):
    attempts_stubbed.extend([oom(), 0])
    injected = make_config("experiment=smoke", "debug.oom_above_tokens=100")
    assert training_run.run_training(injected) == 0
    outcomes = [(a["rung"], a["outcome"]) for a in read_jsonl(Path(injected.run.dir) / "attempts.jsonl")]
    assert outcomes == [(0, "oom"), (1, "completed")]
    assert not fit_memory.exists(), "a fault-injected run wrote the fit memory"
    attempts_stubbed.extend([oom(), 0])
    real = make_config("experiment=smoke", run_dir=str(Path(injected.run.dir).parent / "real"))
    assert training_run.run_training(real) == 0
    (entry,) = json.loads(fit_memory.read_text()).values()
    assert entry["rung"] == 1 and entry["clean_runs"] == 0  # stepped down on the way: not a clean run


def test_stale_staging_is_cleared_before_anything_is_written(tiny_disk, make_config, attempts_stubbed, fit_memory):
    cfg = make_config("experiment=smoke", run_dir=str(tiny_disk / "run"))
    claim(tiny_disk / "run", "test", resume=True)  # an earlier start of this run made it
    staging = tiny_disk / "run" / "checkpoints" / ".staging" / "step_000004"
    staging.mkdir(parents=True)
    fill_until_full(staging / "optimizer.pt")  # a save cut short by a full disk
    attempts_stubbed.append(0)
    assert training_run.run_training(cfg) == 0  # config.yaml, attempts.jsonl... fit once .staging is gone
    assert not staging.parent.exists() and (tiny_disk / "run" / "config.yaml").exists()


def test_a_hard_killed_attempt_is_recorded_at_the_next_start(make_config, attempts_stubbed, fit_memory):
    cfg = make_config("experiment=smoke")
    run = Path(cfg.run.dir)
    claim(run, "test", resume=True)  # an earlier start of this run made it
    (run / "logs").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)))
    # what a process leaves when SIGKILL ends it mid-attempt: the marker of an attempt that never closed
    (run / "logs" / "current_attempt.json").write_text(json.dumps({"rung": 0, "step0": 2, "started": 1.0, "closed": False,
                                                                   "job_id": "4242"}))
    attempts_stubbed.append(0)
    assert training_run.run_training(cfg) == 0
    attempts = read_jsonl(run / "attempts.jsonl")
    assert [a["outcome"] for a in attempts] == ["killed", "completed"]
    assert attempts[0]["steps_done"] == 3 and attempts[0]["job_id"] == "4242" and "SIGKILL" in attempts[0]["error"]
    assert json.loads((run / "logs" / "current_attempt.json").read_text())["closed"] is True
    attempts_stubbed.append(0)
    training_run.run_training(cfg)  # recorded once, not again
    assert [a["outcome"] for a in read_jsonl(run / "attempts.jsonl")] == ["killed", "completed", "completed"]


def test_resume_false_moves_only_the_runs_files_aside(make_config, attempts_stubbed, fit_memory):
    cfg = make_config("experiment=smoke", "run.resume=false")
    run = Path(cfg.run.dir)
    claim(run, "test", resume=True)  # an earlier start of this run made it
    (run / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    attempts_stubbed.append(0)
    assert training_run.run_training(cfg) == 0
    (aside,) = [p for p in run.parent.iterdir() if p.name.startswith(run.name + "-previous-")]
    assert (aside / "metrics.jsonl").exists() and (aside / "checkpoints" / "step_000004").is_dir()
    assert not (run / "metrics.jsonl").exists() and (run / "config.yaml").exists()


def test_train_refuses_a_folder_another_process_trains(make_config, tmp_path):
    cfg = make_config("experiment=smoke")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        Path(cfg.run.dir).mkdir(parents=True)
        RunPaths(Path(cfg.run.dir)).lock.write_text(json.dumps({
            "host": socket.gethostname(), "pid": holder.pid, "pid_start": proc_start_time(holder.pid),
            "job_id": None, "started": "now", "command": "sleep"}))
        proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", "experiment=smoke", f"run.results_dir={tmp_path}",
                               f"run.dir={cfg.run.dir}"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        err = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert err and f"is in use: locked by pid {holder.pid}" in err[0] and "Traceback" not in proc.stderr
        assert not (Path(cfg.run.dir) / "config.yaml").exists()  # nothing written into the busy folder
    finally:
        holder.kill()
        holder.wait()


def test_disk_full_is_one_line_not_a_traceback(make_config, monkeypatch, capsys):
    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "optimizer.pt")

    monkeypatch.setattr(train, "run_training", full)
    monkeypatch.setattr(train, "setup_logging", lambda: None)
    cfg = make_config("experiment=smoke")
    assert train.main(["experiment=smoke", f"run.results_dir={Path(cfg.run.dir).parent}", f"run.dir={cfg.run.dir}"]) == 74
    out = capsys.readouterr().out
    assert out.startswith("error: disk full") and "free space and run the same command again" in out
    with pytest.raises(RunFolderBusy):  # other errors keep their type (RunFolderBusy is a ConfigError: exit 2)
        monkeypatch.setattr(train, "run_training", lambda cfg: (_ for _ in ()).throw(RunFolderBusy(Path("x"), "y")))
        train.main(["experiment=smoke", f"run.results_dir={Path(cfg.run.dir).parent}", f"run.dir={cfg.run.dir}"])
