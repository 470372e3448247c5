"""finellama_rl.status on sweep folders built by hand (no SLURM): the numbers in each
row, the state from files when sacct is absent, --json, --cancel, and bad folders."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finellama_rl import status
from finellama_rl.fileio import append_jsonl, atomic_write_json, atomic_write_text


def make_run(make_config, sweep, name, steps, rewards, accuracy=None, attempts=0, requeues=0, max_steps=8):
    from finellama_rl.compose import config_yaml

    run = sweep / name
    cfg = make_config("experiment=smoke", f"trainer.max_steps={max_steps}", f"run.name={name}", run_dir=str(run))
    atomic_write_text(run / "config.yaml", config_yaml(cfg))
    for step, reward in zip(steps, rewards):
        append_jsonl(run / "metrics.jsonl", {"step": step, "train/reward_mean": reward, "train/loss": 0.1})
    if accuracy:
        atomic_write_json(run / "eval_results.json", {"step": steps[-1], "accuracy": accuracy, "records": []})
    for i in range(attempts):
        append_jsonl(run / "attempts.jsonl", {"attempt": i + 1, "rung": i, "outcome": "oom"})
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
    assert sorted(calls[0]) == ["11", "12", "13"]  # every job of the ledger, in one query
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["run", "job", "state", "requeues", "step", "reward", "accuracy", "scored", "by",
                                           "strict", "lenient", "attempts", "other-jobs"]
    table = rows(out)
    # sacct says 2 restarts, job_events.jsonl 1 requeue: the larger wins
    assert table["grpo-tiny-cpu"] == ["grpo-tiny-cpu", "11", "COMPLETED", "2", "8/8", "0.6250", "25.0%", "finellama/strict",
                                      "25.0%", "43.8%", "-", "-"]
    # the earlier training job 12 of ppo (sacct does not know it) is listed, not hidden
    assert table["ppo-tiny-cpu"] == ["ppo-tiny-cpu", "13", "RUNNING", "0", "3/40", "0.1250", "-", "-", "-", "-", "2", "train", "12"]


def test_without_sacct_state_comes_from_files(sweep, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    status.main([str(sweep), "--json"])
    found = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert found["grpo-tiny-cpu"]["state"] == "done" and found["grpo-tiny-cpu"]["requeues"] == 1
    assert found["grpo-tiny-cpu"]["strict"] == 0.25 and found["grpo-tiny-cpu"]["lenient"] == 0.4375
    assert found["grpo-tiny-cpu"]["accuracy"] == 0.25 and found["grpo-tiny-cpu"]["scorer"] == "finellama/strict"  # schema 1
    assert found["ppo-tiny-cpu"]["state"] == "unknown" and found["ppo-tiny-cpu"]["last_step"] == 3
    assert found["ppo-tiny-cpu"]["max_steps"] == 40 and found["ppo-tiny-cpu"]["attempts"] == 2


def test_local_runs_without_ledger(tmp_path, make_config, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    make_run(make_config, tmp_path, "grpo-tiny-cpu", [1, 2], [0.5, 0.75], accuracy={"strict": 0.5, "lenient": 0.5}, max_steps=2)
    (tmp_path / "not-a-run").mkdir()
    status.main([str(tmp_path)])
    assert rows(capsys.readouterr().out) == {"grpo-tiny-cpu": ["grpo-tiny-cpu", "-", "done", "0", "2/2", "0.7500", "50.0%", "finellama/strict",
                                                                  "50.0%", "50.0%", "-", "-"]}


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


def test_cancel_covers_watchdogs_and_relaunched_jobs(sweep, capsys):
    """--cancel acts on every pending/running job of the ledger: an older relaunch of a run,
    its training job and the watchdogs waiting on them."""
    append_jsonl(sweep / "ledger.jsonl", {"kind": "watchdog", "run": "ppo-tiny-cpu", "run_dir": str(sweep / "ppo-tiny-cpu"),
                                          "job_id": "14", "watches": "13"})

    def states(job_ids):
        return {"11": {"state": "COMPLETED"}, "12": {"state": "RUNNING"}, "13": {"state": "PENDING"},
                "14": {"state": "PENDING"}}

    runs = status.collect(sweep, states)
    ppo = next(r for r in runs if r.run == "ppo-tiny-cpu")
    assert ppo.job_id == "13" and ppo.state == "PENDING"  # the row: the latest training job, not the watchdog
    assert ppo.jobs == ["12", "13", "14"] and ppo.active_jobs == ["12", "13", "14"]
    cancelled = []
    status.cancel_active(runs, cancelled.extend)
    assert sorted(cancelled) == ["12", "13", "14"]


def test_malformed_files_give_one_warning_each_and_no_wrong_numbers(tmp_path, make_config, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    run = make_run(make_config, tmp_path, "grpo-tiny-cpu", [1, 2], [0.5, 0.75], max_steps=4)
    with open(run / "metrics.jsonl", "ab") as f:  # non-UTF-8 bytes, a line without step, a wrong type, not an object
        f.write(b'\xff\xfe{"step": 9}\n{"train/reward_mean": 1}\n{"step": "3", "train/reward_mean": 2}\n[1, 2]\n')
        f.write(b'{"step": 3, "train/reward_mean": "high"}\n')
    atomic_write_json(run / "eval_results.json", {"step": 4, "accuracy": {"strict": 7.5, "lenient": "x"}})
    (run / "attempts.jsonl").write_bytes(b'\x80\x81\n{"attempt": 1, "rung": 0, "outcome": "completed"}\n')
    (run / "logs" / "job_events.jsonl").write_bytes(b'{"event": 5}\n\xc3\x28\n')
    status.main([str(tmp_path), "--json"])
    out = capsys.readouterr()
    (found,) = json.loads(out.out)
    assert found["last_step"] == 3 and found["last_reward"] is None  # "high" is not a reward
    assert found["strict"] is None and found["lenient"] is None  # 7.5 is refused, never 750%
    assert found["attempts"] == 1 and found["requeues"] == 0
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert any("metrics.jsonl: skipped 4 malformed line(s)" in w and "not UTF-8" in w for w in warnings), warnings
    assert any("accuracy.strict: 7.5 is outside [0, 1]" in w for w in warnings), warnings
    assert "750" not in out.out + out.err and "Traceback" not in out.err


def test_config_interpolation_is_never_resolved(tmp_path, make_config, capsys, monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    monkeypatch.setenv("FINELLAMA_TEST_SECRET", "hf_secret_value")
    run = make_run(make_config, tmp_path, "grpo-tiny-cpu", [1], [0.5], max_steps=4)
    text = (run / "config.yaml").read_text().replace("max_steps: 4", "max_steps: ${oc.env:FINELLAMA_TEST_SECRET}")
    (run / "config.yaml").write_text(text)
    status.main([str(tmp_path), "--json"])
    out = capsys.readouterr()
    assert "hf_secret_value" not in out.out + out.err
    assert json.loads(out.out)[0]["max_steps"] is None


def test_table_shows_watchdogs_and_duplicate_training_jobs(sweep, capsys):
    """Jobs the row's training job does not stand for are listed with their states (ended ones
    counted), and two training jobs of one run alive at once are called out."""
    ppo = sweep / "ppo-tiny-cpu"
    append_jsonl(sweep / "ledger.jsonl", {"kind": "watchdog", "run": ppo.name, "run_dir": str(ppo), "job_id": "14", "watches": "13"})
    append_jsonl(sweep / "ledger.jsonl", {"kind": "train", "run": ppo.name, "run_dir": str(ppo), "job_id": "15"})

    def states(job_ids):
        return {"11": {"state": "COMPLETED"}, "12": {"state": "RUNNING"}, "13": {"state": "CANCELLED"},
                "14": {"state": "PENDING"}, "15": {"state": "RUNNING"}}

    assert status.main([str(sweep)], states=states) == 0
    out = capsys.readouterr()
    line = next(l for l in out.out.splitlines() if l.startswith("ppo-tiny-cpu"))
    assert line.split()[1:3] == ["15", "RUNNING"]  # the row: the latest training job
    assert line.endswith("train 12 RUNNING, watchdog 14 PENDING, +1 ended"), line
    assert "warning: ppo-tiny-cpu has 2 training jobs pending or running (12, 15)" in out.err
    assert "scancel 12" in out.err
