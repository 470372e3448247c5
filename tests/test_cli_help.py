"""--help on every entry point (groups and their options, common settings with defaults and
doc lines, flags, examples) and --cfg job (the composed config; nothing runs), handled once
in compose.cli_main with the text of finellama_rl/cli_help.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from finellama_rl import cli_help, launch, train
from finellama_rl.compose import CONF_DIR, cli_main

COMMANDS = ("launch", "train", "evaluate", "status", "report", "plan", "prefetch", "fitmem", "index", "demo", "sbatch_scripts")
OVERRIDE_COMMANDS = ("launch", "train", "plan", "prefetch", "demo")


def test_every_entry_point_answers_help():
    """Each command, as a user types it: exit 0, its own usage and examples; the commands of
    config overrides also list every group with every option of conf/, the common settings and the flags."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {c: subprocess.Popen([sys.executable, "-m", f"finellama_rl.{c}", "--help"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in COMMANDS}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (command, err)
        assert f"python -m finellama_rl.{command}" in out.splitlines()[0], (command, out[:200])
        assert out.count(f"python -m finellama_rl.{command}") >= 2 or command == "sbatch_scripts", (command, out)  # examples
        assert "-h, --help" in out and "Traceback" not in err, command
        if command in OVERRIDE_COMMANDS:
            for group in cli_help.GROUPS:
                line = next(l for l in out.splitlines() if l.startswith(f"  {group:<11} "))
                assert all(p.stem in line for p in (CONF_DIR / group).glob("*.yaml")), (command, line)
            assert "trainer.max_steps" in out and "--cfg job" in out and "run.results_dir" in out, command


def test_help_shows_the_defaults_the_command_composes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(launch.main, ["--help"], overrides=True)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "  model       qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-14b|qwen2.5-3b*|qwen2.5-3b-base|qwen2.5-7b|tiny" in out
    assert "  experiment  " in out and "(default: none)" in out.split("  experiment  ")[1].splitlines()[0]
    row = next(l for l in out.splitlines() if l.startswith("  trainer.max_steps "))
    assert row.split()[1] == "500" and "Global steps to train" in row  # the default composition, config.py's doc line
    from finellama_rl import demo

    with pytest.raises(SystemExit):
        cli_main(demo.main, ["-h"], overrides=True, preset=("experiment=demo",))
    out = capsys.readouterr().out
    assert "composes experiment=demo first" in out
    assert next(l for l in out.splitlines() if l.startswith("  trainer.max_steps ")).split()[1] == "120"  # the demo's


def test_field_docs_are_the_lines_under_each_field_of_config_py():
    docs = cli_help.field_docs()
    assert docs["trainer.max_steps"] == "Global steps to train, both trainers."
    assert docs["run.resume"].startswith("Continue from the latest checkpoint")
    assert docs["hardware.slurm.timeout_min"].startswith("Time limit of one job in minutes")
    assert all(key in docs for key in cli_help.COMMON), [k for k in cli_help.COMMON if k not in docs]


def test_cfg_job_prints_every_run_of_a_sweep_and_runs_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(launch.main, ["-m", "trainer=ppo,grpo", "experiment=smoke", "--cfg", "job", f"run.results_dir={tmp_path / 'r'}"],
                 overrides=True)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    runs = [yaml.safe_load(doc) for doc in out.split("# run ")[1:]]
    assert [r["trainer"]["algo"] for r in runs] == ["ppo", "grpo"]
    assert runs[0]["run"]["sweep"] == runs[1]["run"]["sweep"] and runs[0]["model"]["name"] == "tiny"
    assert Path(runs[1]["run"]["dir"]).parent == tmp_path / "r" / runs[1]["run"]["sweep"]
    assert not (tmp_path / "r").exists()  # nothing planned, created or run
    with pytest.raises(SystemExit) as exc:  # Hydra's other spellings
        cli_main(train.main, ["--cfg=job", "experiment=smoke", "trainer.max_steps=3", f"run.results_dir={tmp_path / 'r'}"],
                 overrides=True, multirun=False)
    assert exc.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 3
    with pytest.raises(SystemExit) as exc:
        cli_main(train.main, ["--cfg", "hydra", "experiment=smoke"], overrides=True)
    assert exc.value.code == 2 and "--cfg takes `job`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a bad setting: the same one line as a run would give
        cli_main(launch.main, ["--cfg", "job", "trainer.lerning_rate=1"], overrides=True)
    assert exc.value.code == 2 and "Did you mean trainer.learning_rate?" in capsys.readouterr().err
