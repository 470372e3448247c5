"""finellama_rl.launch without a cluster: the headline command's dry run (Qwen2.5-3B on
GSM8K) on a machine without SLURM, GPU profiles refused where they cannot run, one
writer per run folder (locks, ledger jobs), unique sweep folders, arguments that survive
Hydra's parser, and a composition cache that behaves exactly like Hydra's compose."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, fake_binaries, path_without_slurm

from finellama_rl import launch
from finellama_rl.login import sweep
from finellama_rl.compose import _COMPOSED, compose_raw, hydra_quote, load_config
from finellama_rl.errors import ConfigError
from finellama_rl.runlock import RunFolderBusy, RunLock, busy_reason, holder_alive, proc_start_time, read_holder
from finellama_rl.results import RunPaths


def launch_cli(args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "finellama_rl.launch", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), cwd=REPO, timeout=timeout)


def test_headline_dry_run_shows_qwen_and_gsm8k_without_slurm(tmp_path, hf_cache_with_headline):
    env = {**os.environ, "HF_HOME": str(hf_cache_with_headline), "HF_HUB_OFFLINE": "1",
           "PATH": path_without_slurm(tmp_path / "bin")}
    results = tmp_path / "results"
    proc = launch_cli(["-m", "trainer=ppo,grpo", "hardware=a100_80", "dry_run=true", "launcher=slurm",
                       f"run.results_dir={results}"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for algo in ("ppo", "grpo"):
        assert (f"config: model=qwen2.5-3b (Qwen/Qwen2.5-3B-Instruct) trainer={algo} data=gsm8k hardware=a100_80"
                in out), out
    # one request: one array of two tasks, one script
    assert out.count("#SBATCH --gpus-per-node=1") == 1 and out.count("#SBATCH --mem=120G") == 1
    assert "#SBATCH --array=0-1%2" in out and "# task 1: run grpo-qwen2.5-3b-a100_80: an srun step" in out
    assert "dry run: 2 run(s) as 1 job(s), nothing submitted" in out and not results.exists()
    # the `# job:` line is a shell command that gives train exactly the planned run
    job = next(line for line in out.splitlines() if line.startswith("# job: "))[len("# job: "):]
    words = shlex.split(job)
    assert words[:3] == ["python", "-m", "finellama_rl.train"]
    folder = next(line for line in out.splitlines() if line.startswith("run folder: "))[len("run folder: "):]
    assert load_config(words[3:]).run.dir == folder


def test_seed_ppo_3b_dry_run_warns_that_its_evaluation_budget_is_not_its_training_budget(tmp_path, hf_cache_with_headline):
    """Issue 21: seed_ppo_3b samples 128 tokens in training and evaluates up to 256: the dry run says so
    (once, naming both keys), submits nothing, and the smoke preset (16 and 16) raises no such warning."""
    base = hf_cache_with_headline / "hub" / "models--Qwen--Qwen2.5-3B"  # the base model seed 004 trained
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    (base / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (base / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    env = {**os.environ, "HF_HOME": str(hf_cache_with_headline), "HF_HUB_OFFLINE": "1",
           "PATH": path_without_slurm(tmp_path / "bin")}
    proc = launch_cli(["experiment=seed_ppo_3b", "dry_run=true", "launcher=slurm", f"run.results_dir={tmp_path / 'r'}"], env)
    assert proc.returncode == 0, proc.stderr
    assert "config: model=qwen2.5-3b-base (Qwen/Qwen2.5-3B) trainer=ppo" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: eval.max_new_tokens: ")]
    assert len(warnings) == 1, proc.stderr
    assert ("evaluation generates up to 256 new tokens (eval.max_new_tokens) but training samples at most 128 "
            "(trainer.max_completion_tokens)") in warnings[0] and "eval.max_new_tokens=128" in warnings[0]
    assert "[in run 0 (experiment=seed_ppo_3b" in warnings[0] and not (tmp_path / "r").exists()
    assert sweep.budget_warnings(sweep.plan_runs(["experiment=smoke", f"run.results_dir={tmp_path / 's'}"])) == []
    two = sweep.plan_runs(["-m", "experiment=smoke", "eval.protocol=lm_eval_gsm8k", "trainer.seed=0,1",
                           f"run.results_dir={tmp_path / 's'}"])
    assert [w.split(":")[0] for w in sweep.budget_warnings(two)] == ["eval.shots"]  # one line for the sweep
    assert sweep.budget_warnings(two)[0].endswith("and 1 more run(s)]")


def test_headline_dry_run_works_without_slurm_gpu_or_model_and_lists_what_it_could_not_check(tmp_path):
    """The README's headline command with dry_run=true, as typed (launcher=auto), on a machine
    with no SLURM, no GPU and an empty model cache: both jobs printed, exit 0, and the list of
    what this machine could not check. Both runs ask for the same resources: one array of two tasks."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1",
           "PATH": path_without_slurm(tmp_path / "bin")}
    proc = launch_cli(["-m", "trainer=ppo,grpo", "hardware=a100_80", "dry_run=true", f"run.results_dir={tmp_path / 'r'}"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("#SBATCH --gpus-per-node=1") == 1 and "#SBATCH --array=0-1" in out
    assert out.count("# job: python -m finellama_rl.train") == 2 and "trainer=ppo" in out and "trainer=grpo" in out
    unchecked = out[out.index("not checked on this machine"):].splitlines()
    assert any(line.startswith("  - SLURM: sbatch is not on PATH") for line in unchecked), out
    assert any(line.startswith("  - model: Qwen/Qwen2.5-3B-Instruct is not reachable") for line in unchecked), out
    assert any(line.startswith("  - data: openai/gsm8k is not reachable") for line in unchecked), out
    assert "dry run: 2 run(s) as 1 job(s), nothing submitted" in out and not (tmp_path / "r").exists()


def test_dry_run_with_slurm_that_does_not_answer_previews_and_says_so(tmp_path, no_slurm_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "fake", NOT_ANSWERING) + os.pathsep + no_slurm_path)
    assert launch.main(["hardware=a100_80", "dry_run=true", f"run.results_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=1" in out and "  - SLURM: sinfo failed: sinfo: error: Unable to contact" in out
    # a bad setting still stops a dry run (exit 2): only what this machine cannot check is listed
    with pytest.raises(ConfigError, match="trainer.micro_batch"):
        launch.main(["hardware=a100_80", "dry_run=true", "trainer.micro_batch=3", f"run.results_dir={tmp_path / 'r'}"])


def test_local_gpu_profile_without_gpu_exits_2(tmp_path):
    present, _ = launch.gpu_present()
    if present:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        launch.main(["hardware=a100_80", "launcher=local", f"run.results_dir={tmp_path / 'r'}"])
    assert err.value.key == "hardware" and "hardware=a100_80 needs a CUDA GPU" in err.value.message
    assert "launcher=slurm" in err.value.message and not (tmp_path / "r").exists()


NOT_ANSWERING = {"sbatch": "exit 0", "sinfo": "echo 'sinfo: error: Unable to contact slurm controller (connect failure)' >&2; exit 1"}


def test_auto_with_sbatch_that_does_not_answer_refuses_a_gpu_profile(tmp_path, no_slurm_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "fake", NOT_ANSWERING) + os.pathsep + no_slurm_path)
    with pytest.raises(ConfigError) as err:
        launch.main(["hardware=a100_80", f"run.results_dir={tmp_path / 'r'}"])
    assert err.value.key == "launcher"
    assert "SLURM does not answer" in err.value.message and "Unable to contact slurm controller" in err.value.message
    assert "hardware=a100_80" in err.value.message and not (tmp_path / "r").exists()
    # a CPU profile still runs locally, with a note
    assert launch.main(["experiment=smoke", "dry_run=true", f"run.results_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert "note: sbatch is installed but SLURM does not answer" in out and "would run locally" in out


def test_sweep_folders_are_unique_for_launches_in_the_same_second(tmp_path):
    args = ["-m", "trainer=ppo,grpo", "experiment=smoke", f"run.results_dir={tmp_path}"]
    first, second = sweep.plan_runs(args), sweep.plan_runs(args)
    for r in second:  # as if both started in the same second
        r.auto_sweep = first[0].auto_sweep
    made = sweep.reserve_sweep(first, create=True) + sweep.reserve_sweep(second, create=True)
    assert [p.name for p in made] == [first[0].auto_sweep, f"{first[0].auto_sweep}-2"]
    assert {Path(r.cfg.run.dir).parent for r in first}.isdisjoint({Path(r.cfg.run.dir).parent for r in second})
    assert second[0].cfg.run.sweep == f"{first[0].auto_sweep}-2"


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def plant_lock(run_dir: Path, pid: int, job_id=None, host=None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunPaths(run_dir).lock
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "pid_start": proc_start_time(pid),
                                "job_id": job_id, "started": "2026-11-30T10:00:00", "command": "test"}))
    return lock


def test_relaunch_into_a_folder_that_a_process_trains_is_refused(tmp_path, sleeper):
    args = ["experiment=smoke", "launcher=local", "dry_run=true", f"run.results_dir={tmp_path}", "run.sweep=s"]
    run_dir = tmp_path / "s" / "grpo-tiny-cpu"
    plant_lock(run_dir, sleeper.pid)
    with pytest.raises(ConfigError) as err:
        launch.main(args)
    msg = err.value.message
    assert err.value.key == "run.dir" and f"{run_dir} is in use: locked by pid {sleeper.pid}" in msg
    assert "wait until it ends and launch the same command again" in msg and "[in run 0" in msg
    with pytest.raises(RunFolderBusy):  # and train itself refuses to share the folder
        RunLock(run_dir).acquire()
    sleeper.kill()
    sleeper.wait()
    assert busy_reason(run_dir) is None  # the holder is gone: a stale lock
    assert launch.main(args) == 0


def test_relaunch_while_the_ledger_shows_a_running_job_is_refused(tmp_path, no_slurm_path, monkeypatch):
    squeue = "case \"$*\" in *77*) echo '77|RUNNING';; esac"
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "fake", {"squeue": squeue}) + os.pathsep + no_slurm_path)
    run_dir = tmp_path / "s" / "grpo-tiny-cpu"
    run_dir.mkdir(parents=True)
    (tmp_path / "s" / "ledger.jsonl").write_text(
        json.dumps({"kind": "train", "run": "grpo-tiny-cpu", "run_dir": str(run_dir), "job_id": "76"}) + "\n" +
        json.dumps({"kind": "watchdog", "run": "grpo-tiny-cpu", "run_dir": str(run_dir), "job_id": "77"}) + "\n")
    with pytest.raises(ConfigError) as err:
        launch.main(["experiment=smoke", "launcher=local", "dry_run=true", f"run.results_dir={tmp_path}", "run.sweep=s"])
    assert "its watchdog job 77 is RUNNING" in err.value.message  # the training job 76 has ended
    assert f"python -m finellama_rl.status {tmp_path / 's'} --cancel (or scancel 77)" in err.value.message


def test_a_launch_holding_the_reservation_makes_a_second_one_exit_2(tmp_path, sleeper):
    """Two launches of one run started together: the second finds the first's launch.lock
    (exclusively created before its last check and its submission) and stops; nothing runs."""
    args = ["experiment=smoke", "launcher=local", f"run.results_dir={tmp_path}", "run.sweep=s"]
    run_dir = tmp_path / "s" / "grpo-tiny-cpu"
    first = sweep.plan_runs(args)
    held = sweep.Reservations(first).__enter__()  # the first launch, between its reservation and its submission
    assert RunPaths(run_dir).launch_lock.exists() and RunPaths(run_dir).marker.exists()
    try:
        with pytest.raises(ConfigError) as err:
            launch.main(args)
        assert err.value.key == "run.dir" and f"{run_dir} is being launched by another command" in err.value.message
        assert f"pid {os.getpid()}" in err.value.message and "nothing was submitted" in err.value.message
        assert sorted(p.name for p in run_dir.iterdir()) == [".finellama_run", "launch.lock"]  # nothing ran
    finally:
        held.__exit__(None, None, None)
    assert not RunPaths(run_dir).launch_lock.exists()
    plant_lock(run_dir, sleeper.pid).rename(RunPaths(run_dir).launch_lock)  # a launch that died holding it: stale
    with pytest.raises(ConfigError, match="being launched by another command"):
        sweep.Reservations(sweep.plan_runs(args)).__enter__()
    sleeper.kill()
    sleeper.wait()
    with sweep.Reservations(sweep.plan_runs(args)):
        assert json.loads(RunPaths(run_dir).launch_lock.read_text())["pid"] == os.getpid()


def test_a_dry_run_reserves_nothing(tmp_path):
    assert launch.main(["experiment=smoke", "launcher=local", "dry_run=true", f"run.results_dir={tmp_path}",
                        "run.sweep=s"]) == 0
    assert not (tmp_path / "s").exists()


def test_a_failed_submission_releases_the_reservation(tmp_path, no_slurm_path, monkeypatch):
    from finellama_rl.errors import SubmissionFailed
    from finellama_rl.login import slurm

    def refuse(chunk, folder, name):
        raise SubmissionFailed("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy")

    monkeypatch.setattr(slurm, "submit_units", refuse)
    runs = sweep.plan_runs(["experiment=smoke", "launcher=slurm", f"run.results_dir={tmp_path / 'r'}", "run.sweep=s"])
    with pytest.raises(ConfigError, match="nothing was submitted"):
        with sweep.Reservations(runs) as held:
            launch.submit_slurm(runs, launch.job_chunks(runs, ask_slurm=False), held.created)
    assert not (tmp_path / "r").exists()  # the folders this launch made, its marker and reservation with them
    with sweep.Reservations(runs):  # free for the next launch
        pass


def test_run_lock_holders(tmp_path, sleeper):
    run_dir = tmp_path / "run"
    with RunLock(run_dir) as lock:
        holder, problem = read_holder(RunPaths(run_dir).lock)
        assert not problem and holder.pid == os.getpid() and holder.host == socket.gethostname()
        assert holder_alive(holder)[0]
        probe = subprocess.run([sys.executable, "-c", "from finellama_rl.runlock import RunLock; import sys; "
                                "RunLock(sys.argv[1]).acquire()", str(run_dir)], capture_output=True, text=True)
        assert probe.returncode == 1 and "is in use: locked by pid" in probe.stderr
    assert not (RunPaths(run_dir).lock).exists() and lock.content is None
    # a job's lock: the scheduler decides; an earlier run of this very job is stale
    plant_lock(run_dir, sleeper.pid, job_id="500", host="node-elsewhere")
    holder, _ = read_holder(RunPaths(run_dir).lock)
    assert holder_alive(holder, scheduler=lambda j: "RUNNING")[0]
    assert not holder_alive(holder, scheduler=lambda j: "COMPLETED")[0]
    assert not holder_alive(holder, scheduler=lambda j: "")[0]  # unknown to SLURM: long gone
    assert holder_alive(holder, scheduler=lambda j: None)[0]  # SLURM cannot say, other host: assume live
    os.environ["SLURM_JOB_ID"] = "500"
    try:
        assert not holder_alive(holder, scheduler=lambda j: "RUNNING")[0]  # our own earlier run (requeue)
        RunLock(run_dir, scheduler=lambda j: "RUNNING").acquire().release()
    finally:
        del os.environ["SLURM_JOB_ID"]
    (RunPaths(run_dir).lock).write_bytes(b"\xff garbage")
    with pytest.raises(RunFolderBusy, match="unreadable lock file"):
        RunLock(run_dir).acquire()


def test_job_arguments_survive_hydra(tmp_path):
    """Folders with spaces, commas, `=`, `$()`, backticks and quotes, and a swept string with
    a comma, reach the job exactly (quoted for Hydra) and are never run by a shell."""
    root = tmp_path / "a b,c=d $(touch x) `id` it's \"q\""
    prompt = "Be brief, please: x=1 $(id)"
    runs = sweep.plan_runs(["-m", "experiment=smoke", f"run.results_dir={hydra_quote(str(root))}",
                             f"data.system_prompt='{prompt}',plain", "run.sweep=s"])
    assert [r.cfg.data.system_prompt for r in runs] == [prompt, "plain"]
    for r in runs:
        again = load_config(r.train_argv())
        assert (again.run.dir, again.run.name, again.run.sweep) == (r.cfg.run.dir, r.cfg.run.name, "s")
        assert again.data.system_prompt == r.cfg.data.system_prompt and again.run.dir.startswith(str(root))
    assert not (REPO / "x").exists() and not root.exists()


CACHE_CASES = [
    ["experiment=smoke", "trainer.learning_rate=3e-4", "trainer.lora.r=4"],
    ["experiment=smoke", "trainer=ppo", "trainer.ppo.epochs=3", "+hardware.slurm.additional.mail-type=END"],
    ["model=tiny", "data=arithmetic", "hardware=cpu", "trainer.rewards=[correctness]", "data.system_prompt='a, b'"],
    ["trainer.lerning_rate=1"], ["experiment=smoke", "trainer.max_steps=abc"], ["hardware=a100"], ["trainer.lora.rr=2"],
]


@pytest.mark.parametrize("overrides", CACHE_CASES)
def test_composition_cache_is_hydras_compose(overrides):
    """The cached group composition + value overrides gives what hydra.compose gives, and
    the same error for a typo."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from finellama_rl.compose import CONF_DIR

    def plain():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="finellama_rl"):
            return compose(config_name="config", overrides=overrides)

    results = []
    for fn in (plain, lambda: compose_raw(overrides), lambda: compose_raw(overrides)):  # the last one is cached
        try:
            results.append(("ok", OmegaConf.to_yaml(fn())))
        except Exception as exc:  # noqa: BLE001 - comparing the errors themselves
            results.append((type(exc).__name__, f"{exc} | {exc.__cause__}"))
    assert results[0] == results[1] == results[2]
    assert _COMPOSED


def test_hundred_run_grid_plans_fast(tmp_path):
    """The ablation grid (4 learning rates x 5 seeds x 5 LoRA ranks) composes in a few seconds
    (benchmarks/bench_launch_grid.py times it with submission on the real cluster)."""
    _COMPOSED.clear()
    t0 = time.perf_counter()
    runs = sweep.plan_runs(["-m", "experiment=smoke", "trainer.learning_rate=1e-4,3e-4,1e-3,3e-3",
                             "trainer.seed=0,1,2,3,4", "trainer.lora.r=2,4,8,16,32", f"run.results_dir={tmp_path}"])
    seconds = time.perf_counter() - t0
    assert len(runs) == 100 and len({r.cfg.run.dir for r in runs}) == 100
    assert {(r.cfg.trainer.learning_rate, r.cfg.trainer.seed, r.cfg.trainer.lora.r) for r in runs} == {
        (lr, s, rank) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for s in range(5) for rank in (2, 4, 8, 16, 32)}
    assert seconds < 20, f"planning 100 runs took {seconds:.1f} s"  # ~3 s measured on 2 shared cores
