"""A fresh start never moves what is not ours (finellama_rl/ownership.py): run folders carry
a marker, run.resume=false moves aside only a marked folder and never the current job's
submitit files, a requeue never replays it, and run.results_dir, run.dir, the sweep folder
and the index folder are never `/`, a home, a system folder or the package."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_resume import tree_digest

from finellama_rl import launch
from finellama_rl.compose import load_config
from finellama_rl.errors import ConfigError
from finellama_rl.job.run_dir import prepare_run_dir
from finellama_rl.ownership import FolderState, claim, folder_state, protected_problem, read_marker
from finellama_rl.results import RunPaths

PACKAGE = REPO / "finellama_rl"


@pytest.mark.parametrize("folder, why", [
    ("/", "system or shared folder"), ("/tmp/..", "/ is a system or shared folder"), ("/tmp", "system or shared"),
    ("/etc", "system folder /etc"), ("/usr/lib/x", "system folder /usr"), ("/proc/1", "system folder /proc"),
    ("/var/log/r", "system folder /var/log"), ("/home/someone", "home folder"), ("/root", "home folder"),
    ("~/.ssh", "dotfolder of the home folder"), (str(PACKAGE / "eval"), "inside the finellama_rl package"),
    (str(REPO), "source checkout"), (str(REPO / "conf" / "r"), "source folder"),
])
def test_folders_that_never_hold_results(folder, why):
    problem = protected_problem(Path(folder).expanduser())
    assert problem and why in problem, problem


@pytest.mark.parametrize("folder", ["/tmp/x", "/var/tmp/r", "~/finellama_results", "~/.cache/finellama/sft",
                                    str(REPO / "results")])
def test_folders_that_may_hold_results(folder):
    assert protected_problem(Path(folder).expanduser()) is None


def test_a_symlink_to_a_system_folder_is_refused_after_resolving(tmp_path):
    (tmp_path / "link").symlink_to("/etc")
    assert "system folder /etc" in protected_problem(tmp_path / "link")


@pytest.mark.parametrize("args, key, needle", [
    (["run.results_dir=/", "run.dir=/tmp"], "run.results_dir", "/ is a system or shared folder"),
    (["run.results_dir=/tmp/..", "run.dir=/etc"], "run.results_dir", "/ is a system or shared folder"),
    (["run.results_dir=/", "run.sweep=s"], "run.results_dir", "/ is a system or shared folder"),
    (["run.results_dir=/tmp/..", "run.sweep=s"], "run.results_dir", "/ is a system or shared folder"),
    (["run.results_dir=/tmp", "run.sweep=s", "run.resume=false"], "run.results_dir", "/tmp is a system"),
    (["run.dir=/tmp/r", "run.allow_outside_results_dir=true"], "run.dir", "the results index would go to /tmp"),
    (["run.dir=/tmp/s/n", "run.sweep=s", "run.name=n", "run.allow_outside_results_dir=true"], "run.dir",
     "the results index would go to /tmp: /tmp is a system"),
    (["run.results_dir={tmp}", "run.dir=/tmp/r", "run.allow_outside_results_dir=true"], "run.dir",
     "its sweep folder (ledger.jsonl): /tmp is a system or shared folder"),
    ([f"run.results_dir={REPO}", f"run.dir={PACKAGE / 'eval'}", "run.resume=false"], "run.results_dir", "source checkout"),
    (["run.results_dir={tmp}", f"run.dir={PACKAGE / 'eval'}", "run.allow_outside_results_dir=true"], "run.dir",
     "inside the finellama_rl package"),
    ([f"run.results_dir={REPO}", "run.sweep=s"], "run.results_dir", "source checkout"),
    ([f"run.results_dir={PACKAGE}", "run.sweep=s"], "run.results_dir", "inside the finellama_rl package"),
])
def test_results_dir_is_checked_like_run_dir(args, key, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        launch.main(["experiment=smoke", "launcher=local", *[a.format(tmp=tmp_path) for a in args]])
    assert err.value.key == key and needle in err.value.message, err.value


@pytest.mark.parametrize("entry", ["train", "launch"])
@pytest.mark.parametrize("resume", ["false", "true"])
def test_a_non_run_folder_named_like_run_dir_is_refused_and_nothing_moves(tmp_path, entry, resume):
    """The sandbox of the issue: run.results_dir=<dir> run.dir=<dir>/home moved .bashrc and code/ aside."""
    home = tmp_path / "home"
    (home / "code").mkdir(parents=True)
    (home / ".bashrc").write_text("export PS1='$ '\n")
    (home / "code" / "main.py").write_text("print('mine')\n")
    before = tree_digest(tmp_path)
    module = "finellama_rl.train" if entry == "train" else "finellama_rl.launch"
    proc = subprocess.run([sys.executable, "-m", module, "experiment=smoke", "launcher=local", f"run.results_dir={tmp_path}",
                           f"run.dir={home}", f"run.resume={resume}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "holds files (.bashrc, code) but is not a finellama_rl run folder" in err and len(err.splitlines()) == 1, err
    assert tree_digest(tmp_path) == before  # nothing moved, nothing written


def test_run_folder_states_and_the_marker(tmp_path):
    run = tmp_path / "r"
    assert folder_state(run) == FolderState.absent
    run.mkdir()
    RunPaths(run).lock.write_text("{}")
    assert folder_state(run) == FolderState.empty  # a lock file alone is ours by name
    (run / "notes.txt").write_text("x")
    assert folder_state(run) == FolderState.foreign
    with pytest.raises(ConfigError, match="not a finellama_rl run folder"):
        claim(run, "test", resume=True)
    (run / "notes.txt").unlink()
    assert claim(run, "test", resume=True) and folder_state(run) == FolderState.ours
    marker = read_marker(run)
    assert marker["created_by"] == "test" and marker["version"] and marker["user"] and marker["fresh_starts"] == []


def test_an_older_run_folder_is_resumed_but_not_moved_aside(tmp_path):
    cfg = load_config(["experiment=smoke", f"run.results_dir={tmp_path}", "run.sweep=s", "run.name=old"])
    run = Path(cfg.run.dir)
    run.mkdir(parents=True)
    from finellama_rl.compose import config_yaml

    RunPaths(run).config.write_text(config_yaml(cfg))  # a run folder written before markers existed
    assert folder_state(run) == FolderState.legacy
    before = tree_digest(tmp_path)
    with pytest.raises(ConfigError, match="older finellama_rl"):
        prepare_run_dir(load_config(["experiment=smoke", f"run.results_dir={tmp_path}", f"run.dir={run}",
                                     "run.resume=false"]))
    assert tree_digest(tmp_path) == before
    prepare_run_dir(cfg)  # resumed: it becomes ours
    assert folder_state(run) == FolderState.ours and read_marker(run)["created_by"] == "train"


def test_resume_false_keeps_the_current_jobs_submitit_files(tmp_path, monkeypatch):
    """A job started with run.resume=false: its own pickles and log in logs/submitit (and its
    watchdog's in logs/watch) stay where submitit reads them; the earlier run moves aside."""
    cfg = load_config(["experiment=smoke", f"run.results_dir={tmp_path}", "run.sweep=s", "run.name=r", "run.resume=false"])
    paths = RunPaths(Path(cfg.run.dir))
    claim(paths.root, "launch", resume=True)
    paths.submitit_logs.mkdir(parents=True)
    paths.watch_logs.mkdir(parents=True)
    (paths.submitit_logs / "87_submitted.pkl").write_bytes(b"job")
    (paths.watch_logs / "88_submitted.pkl").write_bytes(b"dog")
    (paths.root / "metrics.jsonl").write_text('{"step": 1}\n')
    paths.checkpoints.mkdir()
    paths.current_attempt.write_text('{"rung": 0, "step0": 0, "closed": false}')
    paths.job_events.write_text(json.dumps({"event": "start", "job_id": "80"}) + "\n" +
                                json.dumps({"event": "start", "job_id": "87"}) + "\n")
    monkeypatch.setenv("SLURM_JOB_ID", "87")
    prepare_run_dir(cfg)
    (aside,) = [p for p in paths.root.parent.iterdir() if p.name.startswith("r-previous-")]
    assert (paths.submitit_logs / "87_submitted.pkl").exists() and (paths.watch_logs / "88_submitted.pkl").exists()
    assert (aside / "metrics.jsonl").exists() and (aside / "checkpoints").is_dir()
    assert (aside / "logs" / "current_attempt.json").exists() and not paths.current_attempt.exists()
    assert [e["job_id"] for e in map(json.loads, paths.job_events.read_text().splitlines())] == ["87"]
    assert read_marker(aside) is not None  # the old run stays a run folder
    (start,) = read_marker(paths.root)["fresh_starts"]
    assert start["job_id"] == "87" and start["restarts"] == 0 and start["moved_to"] == str(aside)
    fresh = RunPaths(paths.root.parent / "fresh")  # a new folder launch made: the job's start event is all it holds
    claim(fresh.root, "launch", resume=True)
    fresh.submitit_logs.mkdir(parents=True)
    fresh.job_events.write_text(json.dumps({"event": "start", "job_id": "87"}) + "\n")
    prepare_run_dir(load_config(["experiment=smoke", f"run.results_dir={tmp_path}", f"run.dir={fresh.root}",
                                 "run.resume=false"]))
    assert not [p for p in paths.root.parent.iterdir() if p.name.startswith("fresh-previous-")]  # nothing to move
    assert fresh.job_events.exists() and read_marker(fresh.root)["fresh_starts"][0]["moved_to"] is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeue replays run.resume=false: nothing moves again
    (paths.root / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    prepare_run_dir(cfg)
    assert (paths.root / "metrics.jsonl").exists() and len(list(paths.root.parent.iterdir())) == 3


def test_a_folder_whose_marker_another_launch_is_writing_is_not_foreign(tmp_path):
    """Two launches of one run at the same moment: the second sees the first's marker half
    written (fileio's temp name next to it) and must find a folder being made, not refuse it
    as foreign (it then stops at the first's launch.lock); any other file is still foreign."""
    from finellama_rl.ownership import FolderState, folder_state

    run = tmp_path / "run"
    run.mkdir()
    (run / "..finellama_run.r0uudjh0.tmp").write_text("{")
    (run / "launch.lock").write_text("{}")
    assert folder_state(run) == FolderState.empty
    (run / "notes.txt").write_text("mine")
    assert folder_state(run) == FolderState.foreign
