"""A run folder's config.yaml is the truth on resume (finellama_rl/resume.py): the command
line may only restate it or change the allow-list; a finished run asked to train again
changes nothing; a run whose checkpoints all fail verification stops with exit 2 and
nothing moved; run.resume=false starts the same run over, once per job."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from finellama_rl.checkpoint import commit_checkpoint
from finellama_rl.compose import config_yaml, load_config
from finellama_rl.errors import ConfigError
from finellama_rl.fileio import atomic_write_json
from finellama_rl.ownership import LAUNCH_ID_ENV, claim, record_fresh_start
from finellama_rl.results import RunPaths
from finellama_rl.resume import RunConfigDiffers, start_config

SMOKE = ["experiment=smoke", "trainer.learning_rate=2e-3", "trainer.max_steps=6", "debug.crash_after_step=4"]


def tree_digest(root: Path) -> str:
    """Every path under `root` with its kind, mode and content: any change shows."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}|{st.st_mode:o}|".encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def saved_run(tmp_path):
    """A run folder as train leaves it before its first step: marker and config.yaml."""
    overrides = [*SMOKE, f"run.results_dir={tmp_path}", "run.sweep=s", "run.name=r"]
    cfg = load_config(overrides)
    claim(Path(cfg.run.dir), "test", resume=True)
    RunPaths(Path(cfg.run.dir)).config.write_text(config_yaml(cfg))
    return overrides, cfg


def test_the_same_command_resumes_with_exactly_the_saved_config(saved_run):
    overrides, cfg = saved_run
    again = start_config(overrides)
    assert config_yaml(again) == RunPaths(Path(cfg.run.dir)).config.read_text()


def test_run_dir_alone_resumes_the_runs_own_config_not_the_defaults(saved_run):
    _, cfg = saved_run
    resumed = start_config([f"run.dir={cfg.run.dir}"])  # the defaults are Qwen2.5-3B GRPO on a100_80
    assert (resumed.model.name, resumed.hardware.name, resumed.trainer.learning_rate) == ("tiny", "cpu", 2e-3)
    assert (resumed.run.name, resumed.run.sweep, resumed.run.results_dir) == ("r", "s", cfg.run.results_dir)
    assert resumed.debug.crash_after_step is None  # a test hook of the first start only, never kept


@pytest.mark.parametrize("extra, keys, shown", [
    (["trainer.learning_rate=1e-4"], "trainer.learning_rate", "the run has 0.002, the command line gives 0.0001"),
    (["trainer.max_steps=5"], "trainer.max_steps", "(it may only go up)"),
    (["eval.protocol=finellama"], "eval.protocol", "the run has qwen_boxed, the command line gives finellama"),
    (["trainer=ppo"], "trainer.algo", "the run has grpo, the command line gives ppo"),
])
def test_a_differing_override_is_refused_naming_it(saved_run, extra, keys, shown):
    overrides, cfg = saved_run
    before = tree_digest(Path(cfg.run.dir))
    with pytest.raises(RunConfigDiffers) as err:
        start_config([*overrides, *extra])
    assert keys in err.value.key.split(", ") and shown in err.value.message, err.value
    assert f"python -m finellama_rl.train run.dir={cfg.run.dir}" in err.value.message
    assert tree_digest(Path(cfg.run.dir)) == before


def test_the_allow_list_may_change_on_resume(saved_run):
    overrides, _ = saved_run
    cfg = start_config([*overrides, "trainer.max_steps=9", "eval.num_examples=4", "hardware.slurm.partition=fat",
                        "ladder.start_rung=2", "+hardware.slurm.additional.mail-type=END"])
    assert (cfg.trainer.max_steps, cfg.eval.num_examples, cfg.hardware.slurm.partition, cfg.ladder.start_rung) == \
        (9, "4", "fat", 2)
    assert cfg.hardware.slurm.additional == {"mail-type": "END"}
    assert cfg.trainer.learning_rate == 2e-3 and cfg.run.resume


def test_resume_false_starts_the_same_run_over_with_typed_settings_on_top(saved_run):
    _, cfg = saved_run
    same = start_config([f"run.dir={cfg.run.dir}", "run.resume=false"])
    assert (same.model.name, same.trainer.learning_rate, same.trainer.max_steps, same.run.resume) == ("tiny", 2e-3, 6, False)
    changed = start_config([f"run.dir={cfg.run.dir}", "run.resume=false", "trainer.micro_batch=8"])
    assert changed.trainer.micro_batch == 8 and changed.trainer.learning_rate == 2e-3
    assert changed.trainer.grad_accum == cfg.trainer.grad_accum // 2  # derived again from the new micro batch


def test_a_requeue_never_replays_resume_false(saved_run, monkeypatch):
    _, cfg = saved_run
    args = [f"run.dir={cfg.run.dir}", "run.resume=false"]
    monkeypatch.setenv(LAUNCH_ID_ENV, "launch-a")
    record_fresh_start(Path(cfg.run.dir), None)  # what the job's first start did
    assert start_config(args).run.resume  # the same job again: resume
    monkeypatch.setenv(LAUNCH_ID_ENV, "launch-b")
    assert not start_config(args).run.resume  # another launch: start over as asked
    monkeypatch.delenv(LAUNCH_ID_ENV)
    monkeypatch.setenv("SLURM_JOB_ID", "812")  # sbatch scripts: the job id and its restart count decide
    record_fresh_start(Path(cfg.run.dir), None)
    assert not start_config(args).run.resume  # same job, not restarted (e.g. a second command in one allocation)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert start_config(args).run.resume


def test_a_planted_interpolation_stays_text_on_resume(saved_run, monkeypatch):
    import yaml

    _, cfg = saved_run
    monkeypatch.setenv("FINELLAMA_TEST_SECRET", "s3cret")
    path = RunPaths(Path(cfg.run.dir)).config
    data = yaml.safe_load(path.read_text())
    data["data"]["system_prompt"] = "${oc.env:FINELLAMA_TEST_SECRET}"
    path.write_text(yaml.safe_dump(data))
    resumed = start_config([f"run.dir={cfg.run.dir}"])
    assert resumed.data.system_prompt == "${oc.env:FINELLAMA_TEST_SECRET}"
    assert "s3cret" not in config_yaml(resumed)


# --- through train: a finished run, a differing relaunch, damaged checkpoints -------------------------------

FAST = ["experiment=smoke", "trainer.max_steps=2", "trainer.prompts_per_step=1", "trainer.num_generations=4",
        "trainer.micro_batch=4", "eval.num_examples=4"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run trained to its end (2 steps) under umask 002, as on a shared results folder."""
    from finellama_rl import train

    root = tmp_path_factory.mktemp("finished")
    overrides = [*FAST, f"run.results_dir={root}", "run.sweep=s", "run.name=done"]
    old = os.umask(0o002)
    try:
        assert train.main(overrides) == 0
    finally:
        os.umask(old)
    return overrides, root / "s" / "done"


def test_checkpoint_files_of_a_trained_run_are_group_readable_under_umask_002(finished_run):
    _, run = finished_run
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files) and any(p.name == "rng_state.pth" for p in files)
    modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    assert all(m == 0o664 for m in modes.values()), modes


def test_a_finished_run_asked_to_train_again_changes_nothing(finished_run, capsys):
    from finellama_rl import train

    overrides, run = finished_run
    config, attempts, before = (run / "config.yaml").read_bytes(), (run / "attempts.jsonl").read_bytes(), tree_digest(run)
    assert train.main([f"run.dir={run}"]) == 0  # README's resume pattern, no override repeated
    assert train.main(overrides) == 0  # the same command as the first time
    assert "already finished at step 2/2" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == config and (run / "attempts.jsonl").read_bytes() == attempts
    assert tree_digest(run) == before


def test_a_differing_override_exits_2_naming_it_and_writes_nothing(finished_run):
    _, run = finished_run
    before = tree_digest(run)
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", f"run.dir={run}", "trainer.learning_rate=0.5"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: trainer.learning_rate: differs from the config.yaml") and len(err.splitlines()) == 1, err
    assert tree_digest(run) == before


def test_a_relaunch_that_differs_is_refused_before_anything_runs(finished_run):
    from finellama_rl import launch

    overrides, run = finished_run
    before = tree_digest(run.parent)
    with pytest.raises(ConfigError) as err:
        launch.main([*overrides, "launcher=local", "trainer.seed=7"])
    assert err.value.key == "trainer.seed" and "[in run 0" in err.value.message
    assert tree_digest(run.parent) == before
    assert launch.main([*overrides, "launcher=local"]) == 0  # the same command: "already finished", released
    assert tree_digest(run.parent) == before


def damaged_run(root: Path) -> Path:
    """A run folder whose two committed checkpoints both fail verification (a truncated and a changed file)."""
    cfg = load_config([*FAST, f"run.results_dir={root}", "run.sweep=s", "run.name=damaged"])
    run = RunPaths(Path(cfg.run.dir))
    claim(run.root, "test", resume=True)
    run.config.write_text(config_yaml(cfg))
    for step in (1, 2):
        staged = run.checkpoints / ".staging" / f"step_{step:06d}"
        staged.mkdir(parents=True)
        (staged / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
        commit_checkpoint(run.checkpoints, staged, step, {}, keep_last=3)
    (run.checkpoints / "step_000001" / "adapter_model.safetensors").write_bytes(b"short")
    (run.checkpoints / "step_000002" / "adapter_model.safetensors").write_bytes(bytes(reversed(range(256))) * 8)
    atomic_write_json(run.root / "note.json", {"kept": True})
    return run.root


def test_all_checkpoints_damaged_exits_2_and_moves_nothing(tmp_path):
    run = damaged_run(tmp_path)
    before = tree_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", f"run.dir={run}"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: run.resume: every checkpoint of") and "Traceback" not in proc.stderr, err
    assert "step_000002: adapter_model.safetensors differs from the manifest" in err and "step_000001:" in err
    assert f"run.dir={run} run.resume=false" in err
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("whiten, scaling", [(False, "none"), (True, "batch")])
def test_a_ppo_run_written_before_the_advantage_scaling_knob_resumes_and_evaluates_as_it_trained(
        tmp_path, whiten, scaling):
    """Issue 20 renamed trainer.ppo.whiten_advantages to trainer.advantage_scaling (whose schema
    default, group, PPO refuses): an older PPO config.yaml is read as what it trained with."""
    import yaml

    from finellama_rl import evaluate

    cfg = load_config(["experiment=smoke", "trainer=ppo", f"run.results_dir={tmp_path}", "run.sweep=s", "run.name=old"])
    claim(Path(cfg.run.dir), "test", resume=True)
    data = yaml.safe_load(config_yaml(cfg))
    del data["trainer"]["advantage_scaling"]
    data["trainer"]["ppo"]["whiten_advantages"] = whiten
    RunPaths(Path(cfg.run.dir)).config.write_text(yaml.safe_dump(data))
    assert start_config([f"run.dir={cfg.run.dir}"]).trainer.advantage_scaling.value == scaling
    assert evaluate.load_run_config(Path(cfg.run.dir)).trainer.advantage_scaling.value == scaling
