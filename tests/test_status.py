"""finellama_rl.status on sweep folders built by hand (no SLURM): the numbers in each
row, the state from files when sacct is absent, --json, --cancel, and bad folders."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finellama_rl import status
from finellama_rl.results import append_jsonl, atomic_write_json, atomic_write_text


def make_run(make_config, sweep, name, steps, rewards, accuracy=None, attempts=0, requeues=0, max_steps=8):
    from finellama_rl.train import config_yaml

    run = sweep / name
    cfg = make_config("experiment=smoke", f"trainer.max_steps={max_steps}", f"run.name={name}", run_dir=str(run))
    atomic_write_text(run / "config.yaml", config_yaml(cfg))
    for step, reward in zip(steps, rewards):
        append_jsonl(run / "metrics.jsonl", {"step": step, "train/reward_mean": reward, "train/loss": 0.1})
    if accuracy:
        atomic_write_json(run / "eval_results.json", {"step": steps[-1], "accuracy": accuracy, "records": []})
    for i in range(attempts):
        append_jsonl(run / "attempts.jsonl", {"attempt": i + 1, "outcome": "oom"})
    (run / "logs").mkdir(exist_ok=True)
    for i in range(requeues):
        append_jsonl(run / "logs" / "job_events.jsonl", {"event": "start", "restarts": i})
        append_jsonl(run / "logs" / "job_events.jsonl", {"event": "requeue", "restarts": i + 1})
    return run


@pytest.fixture
def sweep(tmp_path, make_config):
    sweep = tmp_path / "2026-11-23_10-00-00"
    done = make_run(make_config, sweep, "grpo-tiny-cpu", [1, 2, 3, 4, 5, 6, 7, 8], [0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.625],
                    accuracy={"strict": 0.25, "lenient": 0.4375}, requeues=1)
    running = make_run(make_config, sweep, "ppo-tiny-cpu", [1, 2, 3], [0.0, 0.5, 0.125], attempts=2, max_steps=40)
    for i, (run, job) in enumerate([(done, "11"), (running, "12"), (running, "13")]):  # ppo was resubmitted as 13
        append_jsonl(sweep / "ledger.jsonl", {"run": run.name, "run_dir": str(run), "job_id": job, "time": f"t{i}"})
    return sweep


def fake_states(calls):
    def states(job_ids):
        calls.append(list(job_ids))
        return {"11": {"state": "COMPLETED", "restarts": "2", "elapsed": "00:03:00"},
                "13": {"state": "RUNNING", "restarts": "0", "elapsed": "00:01:00"}}

    return states


def rows(text):
    return {line.split()[0]: line.split() for line in text.strip().splitlines()[1:]}


def test_table_numbers_from_files_and_scheduler(sweep, capsys):
    calls = []
    assert status.main([str(sweep)], states=fake_states(calls)) == 0
    assert sorted(calls[0]) == ["11", "13"]  # the latest submission of each run
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["run", "job", "state", "requeues", "step", "reward", "strict", "lenient", "attempts"]
    table = rows(out)
    # sacct says 2 restarts, job_events.jsonl 1 requeue: the larger wins
    assert table["grpo-tiny-cpu"] == ["grpo-tiny-cpu", "11", "COMPLETED", "2", "8/8", "0.6250", "25.0%", "43.8%", "-"]
    assert table["ppo-tiny-cpu"] == ["ppo-tiny-cpu", "13", "RUNNING", "0", "3/40", "0.1250", "-", "-", "2"]


def test_without_sacct_state_comes_from_files(sweep, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    status.main([str(sweep), "--json"])
    found = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert found["grpo-tiny-cpu"]["state"] == "done" and found["grpo-tiny-cpu"]["requeues"] == 1
    assert found["grpo-tiny-cpu"]["strict"] == 0.25 and found["grpo-tiny-cpu"]["lenient"] == 0.4375
    assert found["ppo-tiny-cpu"]["state"] == "unknown" and found["ppo-tiny-cpu"]["last_step"] == 3
    assert found["ppo-tiny-cpu"]["max_steps"] == 40 and found["ppo-tiny-cpu"]["attempts"] == 2


def test_local_runs_without_ledger(tmp_path, make_config, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    make_run(make_config, tmp_path, "grpo-tiny-cpu", [1, 2], [0.5, 0.75], accuracy={"strict": 0.5, "lenient": 0.5}, max_steps=2)
    (tmp_path / "not-a-run").mkdir()
    status.main([str(tmp_path)])
    assert rows(capsys.readouterr().out) == {"grpo-tiny-cpu": ["grpo-tiny-cpu", "-", "done", "0", "2/2", "0.7500", "50.0%", "50.0%", "-"]}


def test_cancel_only_active_jobs(sweep):
    runs = status.collect(sweep, fake_states([]))
    cancelled = []
    assert [r.run for r in status.cancel_active(runs, cancelled.extend)] == ["ppo-tiny-cpu"]
    assert cancelled == ["13"]


@pytest.mark.parametrize("make_folder, needle", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "has no ledger.jsonl and no run folders"),
])
def test_bad_folder_exits_2_naming_it(tmp_path, capsys, make_folder, needle):
    from finellama_rl.compose import cli_main

    folder = make_folder(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(status.main, [str(folder)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and needle in err and len(err.strip().splitlines()) == 1


def test_command_line_does_not_import_torch(sweep):
    code = ("import sys, runpy; sys.argv = ['status', sys.argv[1]]\n"
            "try: runpy.run_module('finellama_rl.status', run_name='__main__')\n"
            "except SystemExit as e: assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'status imported torch'")
    proc = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "grpo-tiny-cpu" in proc.stdout
