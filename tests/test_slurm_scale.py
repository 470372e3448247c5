"""Scaling out on the real local cluster (two nodes, tests/slurm_cluster.py): a sweep as
one job array, three runs packed in one job, one run across two nodes.

    pytest -m slurm tests/test_slurm_scale.py -s      # -s shows the timings

Every scenario is submitted when the module starts (the `scale` fixture), and a driver
thread per scenario acts on it at the right moment (a warning, a requeue), so that they
overlap on the 2-CPU machine; the tests then wait and check:
- array: 6 runs of one request with array_parallelism=2 -> one array; task 0 gets the
  time-limit warning (USR2, as `scancel --signal=USR2 <array>_<task>` delivers it) and is
  requeued alone; tasks 1 and 3 go over their host memory at rung 0 (their step is killed
  OUT_OF_MEMORY) and are retried in the same task at rung 1 (this replaces the watchdog
  test of the OOM ladder across the scheduler); task 5 is cancelled while pending.
- pack: 3 runs in one job (hardware.runs_per_gpu=3); one goes over its memory share and
  is stepped down alone while the other two go on; `scontrol requeue` of the job resumes
  all three; every step of every run once.
- nodes: PPO on 2 nodes x 1 process, requeued mid-run on the warning signal, and GRPO on
  2 nodes x 1 process: identical adapters on both nodes, and the curve of one process at
  the same global batch (the tolerance of tests/test_distributed.py: rel 1e-3, abs 1e-6).
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from finellama_rl.checkpoint import list_checkpoints, read_state
from finellama_rl.fileio import read_jsonl
from test_slurm import FAST_GRPO, Submitted, events, job_logs, metric_steps, run_module, submit, timing, wait_terminal

pytestmark = pytest.mark.slurm

ONE_CPU = ["hardware.slurm.cpus_per_task=1", "hardware.slurm.timeout_min=10"]
ARRAY = ["-m", "trainer.seed=1,2,3", "debug.host_mem_mb_per_sequence=0,500", *FAST_GRPO, "trainer.max_steps=12",
         "trainer.save_every=4", "hardware.slurm.mem_gb=2", "hardware.slurm.array_parallelism=2", "ladder.remember_fit=false"]
PACK = ["-m", "debug.host_mem_mb_per_sequence=0,1,600", *FAST_GRPO, "trainer.max_steps=48", "trainer.save_every=4",
        "hardware.runs_per_gpu=3", "hardware.slurm.cpus_per_task=2", "hardware.slurm.mem_gb=7",
        "hardware.slurm.timeout_min=10", "ladder.remember_fit=false"]
# tests/test_distributed.py's comparison: global batch 8 sequences, one process samples them in two calls of 4
NODES = ["eval.protocol=finellama", "eval.num_examples=2", "eval.max_new_tokens=4", "eval.before_training=false",
         "trainer.max_completion_tokens=12", "trainer.rewards=[digits]", "trainer.learning_rate=3e-3",
         "trainer.micro_batch=2", "ladder.remember_fit=false", "hardware.nodes=2", "hardware.processes=1",
         "hardware.slurm.mem_gb=3", *ONE_CPU]
ALGO = {"ppo": ["trainer=ppo", "trainer.prompts_per_step=8", "trainer.max_steps=12", "trainer.save_every=4"],
        "grpo": ["trainer=grpo", "trainer.prompts_per_step=2", "trainer.num_generations=4", "trainer.loss_type=grpo",
                 "trainer.max_steps=3", "trainer.save_every=3"]}
KEYS = ("train/reward_mean", "train/loss", "train/grad_norm")


class QueueWatch(threading.Thread):
    """Polls `squeue -r` for one array: the most tasks seen running at once."""

    def __init__(self, env: Dict[str, str], array: str):
        super().__init__(daemon=True)
        self.env, self.array, self.most, self.polls, self.done = env, array, 0, 0, False

    def run(self) -> None:
        while not self.done:
            out = subprocess.run(["squeue", "-h", "-r", "-j", self.array, "-o", "%i|%T"], capture_output=True, text=True,
                                 env=self.env).stdout
            running = sum(1 for line in out.splitlines() if line.endswith("|RUNNING"))
            self.most, self.polls = max(self.most, running), self.polls + 1
            time.sleep(0.5)


class Driver(threading.Thread):
    """Waits (in the background) until `ready()` and then runs `act()` once; `what`
    records what happened, for the test that checks the outcome."""

    def __init__(self, ready: Callable[[], bool], act: Callable[[], None], timeout_s: float = 900):
        super().__init__(daemon=True)
        self.ready, self.act, self.timeout_s, self.what = ready, act, timeout_s, "waiting"

    def run(self) -> None:
        end = time.time() + self.timeout_s
        while time.time() < end:
            try:
                if self.ready():
                    self.act()
                    self.what = "acted"
                    return
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.what = f"failed: {exc!r}"
                return
            time.sleep(0.3)
        self.what = "timed out"


def warn_once(env: Dict[str, str], job: str, run: Path, timeout_s: float = 90) -> None:
    """The time-limit warning (USR2) to a job, once. scancel retries a signal that slurmctld
    answers "Job can not be altered now" (up to 10 times, 5 s and more apart), and slurmctld
    has answered so to an array task while passing the signal on: the retries then reached
    the requeued task a minute later, just started (CI of 2026-12-07). So scancel is stopped
    once the job's controller has passed the signal on (or gave the run up)."""
    proc = subprocess.Popen(["scancel", "--signal=USR2", job], env=env)
    end = time.time() + timeout_s
    try:
        while proc.poll() is None and time.time() < end:
            if any(e["event"] in ("signal_forwarded", "run_exit") for e in events(run)):
                break
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@dataclass
class Scale:
    env: Dict[str, str]
    root: Path
    array: Submitted
    pack: Submitted
    nodes: Dict[str, Submitted]
    watch: QueueWatch
    drivers: Dict[str, Driver]
    cancelled: str = ""


@pytest.fixture(scope="module")
def env(slurm_cluster):
    import os

    return {**os.environ, **slurm_cluster}


def finished(run: Path) -> bool:
    return (run / "eval_results.json").exists()


@pytest.fixture(scope="module")
def scale(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    nodes = {algo: submit(env, root / f"nodes-{algo}", *NODES, *args) for algo, args in ALGO.items()}
    array = submit(env, root / "array", *ARRAY, *ONE_CPU)
    pack = submit(env, root / "pack", *PACK)
    tasks = by_task(array)
    # task 5 is cancelled while it waits behind the throttle
    cancel = run_module("finellama_rl.status", [str(array.sweep), "--cancel", "--run", tasks[5]["run"]], env)
    watch = QueueWatch(env, tasks[0]["array"])
    watch.start()
    first, ppo = Path(tasks[0]["run_dir"]), nodes["ppo"].run_dir
    runs = {e["run"]: Path(e["run_dir"]) for e in pack.trains}
    oom = next(r for name, r in runs.items() if name.endswith("_600"))
    drivers = {
        # the time-limit warning to task 0 once it is past its first checkpoint
        "array": Driver(lambda: len(metric_steps(first)) >= 5 or finished(first),
                        lambda: warn_once(env, tasks[0]["job_id"], first)),
        # requeue the pack once the overflowing run was restarted one rung down and the others are past
        # step 9 (the restarted run may still be loading: then it has nothing to save, and starts again)
        "pack": Driver(lambda: events(oom, "oom_retry") and all(len(metric_steps(r)) >= 9 for r in runs.values() if r != oom)
                       or any(map(finished, runs.values())),
                       lambda: subprocess.run(["scontrol", "requeue", pack.job_ids[0]], check=True, env=env, timeout=30)),
        # the warning to the 2-node PPO job at step 3
        "ppo": Driver(lambda: len(metric_steps(ppo)) >= 3 or finished(ppo),
                      lambda: warn_once(env, nodes["ppo"].job_ids[0], ppo)),
    }
    for d in drivers.values():
        d.start()
    yield Scale(env, root, array, pack, nodes, watch, drivers, cancel.stdout + cancel.stderr)
    watch.done = True


def by_task(sub: Submitted) -> List[dict]:
    return sorted(sub.trains, key=lambda e: e.get("task", 0))


def sacct_steps(env: Dict[str, str], job: str) -> List[List[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-D", "-o", "JobID,JobName,State", "-j", job], capture_output=True,
                         text=True, env=env).stdout  # -D: the steps of every run of a requeued job
    return [line.split("|") for line in out.splitlines() if re.match(rf"{re.escape(job)}\.\d+\|", line)]


def oom_attempts(run: Path) -> List[tuple]:
    return [(a["rung"], a["micro_batch"], a["outcome"]) for a in read_jsonl(run / "attempts.jsonl")]


# --- arrays ----------------------------------------------------------------------------------------
def test_a_sweep_of_one_request_is_one_array_and_one_cancelled_task_leaves_the_others(scale):
    tasks = by_task(scale.array)
    array = tasks[0]["array"]
    assert [e["job_id"] for e in tasks] == [f"{array}_{i}" for i in range(6)], tasks
    assert "submitted 6 run(s) as 1 job(s) (1 of them arrays)" in scale.array.stdout
    assert len({e["run"] for e in tasks}) == 6
    assert f"cancelled 1 job(s): {tasks[5]['run']} (job {array}_5, PENDING)" in scale.cancelled, scale.cancelled
    t0 = time.time()
    # a task cancelled while pending: squeue says CANCELLED for MinJobAge, sacct never knows it
    final = wait_terminal([e["job_id"] for e in tasks[:5]], 900, [Path(e["run_dir"]) for e in tasks])
    timing("array of 6 runs (5 trained, 2 of them twice for memory, 1 requeued)", time.time() - t0)
    assert not (Path(tasks[5]["run_dir"]) / "metrics.jsonl").exists()
    for e in tasks[:5]:
        assert final[e["job_id"]]["state"] == "COMPLETED", job_logs(Path(e["run_dir"]))
        assert metric_steps(Path(e["run_dir"])) == list(range(1, 13))  # every step of every run once
    scale.watch.done = True
    assert scale.watch.polls > 20 and scale.watch.most == 2, (scale.watch.polls, scale.watch.most)
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-j", array], capture_output=True, text=True,
                           env=scale.env).stdout.split()
    assert {j.split("_")[0] for j in sacct} == {array} and f"{array}_5" not in sacct, sacct  # one array id


def test_the_warning_to_one_task_requeues_that_task_only(scale):
    tasks = by_task(scale.array)
    first = Path(tasks[0]["run_dir"])
    final = wait_terminal([e["job_id"] for e in tasks[:5]], 900, [first])
    assert scale.drivers["array"].what == "acted", scale.drivers["array"].what
    assert final[tasks[0]["job_id"]]["state"] == "COMPLETED" and int(final[tasks[0]["job_id"]]["restarts"]) == 1, final
    assert [e["restarts"] for e in events(first, "start")] == [0, 1]
    assert events(first, "signal")[0]["code"] == 75 and events(first, "requeue")[0]["job_id"] == tasks[0]["job_id"]
    resumed = re.findall(r"resuming from step (\d+)", job_logs(first, tail=0))
    assert resumed and 5 <= int(resumed[0]) < 12, resumed
    assert metric_steps(first) == list(range(1, 13))  # every step once
    for e in tasks[1:5]:
        run = Path(e["run_dir"])
        assert not events(run, "requeue") and {s["restarts"] for s in events(run, "start")} == {0}, events(run)
        assert int(final[e["job_id"]]["restarts"]) == 0


def test_a_host_oom_in_one_task_is_retried_in_that_task_at_the_next_rung(scale):
    tasks = by_task(scale.array)
    wait_terminal([e["job_id"] for e in tasks[:5]], 900, [])
    for e in tasks[:5]:
        run, oom = Path(e["run_dir"]), "host_mem_mb_per_sequence=500" in " ".join(e["argv"])
        steps = sacct_steps(scale.env, e["job_id"])
        if oom:  # 4 x 500 MB at micro batch 4 overflow the step's 2 GB - 256 MB; micro batch 2 fits
            assert oom_attempts(run) == [(0, 4, "oom_killed"), (1, 2, "completed")], oom_attempts(run)
            attempts = read_jsonl(run / "attempts.jsonl")
            assert "OUT_OF_MEMORY" in attempts[0]["error"] and attempts[1]["peak_host_rss_gb"] < 2.0
            assert [s[2] for s in steps if s[1] == e["run"]] == ["OUT_OF_MEMORY", "COMPLETED"], steps
            assert [x["decision"] for x in events(run, "oom_retry")] == ["rung 1"]
        else:
            assert "oom_killed" not in [a["outcome"] for a in read_jsonl(run / "attempts.jsonl")]
            assert "OUT_OF_MEMORY" not in [s[2] for s in steps], steps
        assert json.loads((run / "eval_results.json").read_text())["step"] == 12
    rows = {r["run"]: r for r in json.loads(run_module("finellama_rl.status", [str(scale.array.sweep), "--json"],
                                                        scale.env).stdout)}
    assert [rows[e["run"]]["job_id"] for e in tasks] == [e["job_id"] for e in tasks]
    assert [rows[e["run"]]["state"] for e in tasks[:5]] == ["COMPLETED"] * 5
    assert rows[tasks[0]["run"]]["requeues"] == 1 and rows[tasks[1]["run"]]["attempts"] == 2


# --- packs -----------------------------------------------------------------------------------------
def test_three_packed_runs_finish_with_their_own_files_one_stepped_down_all_resumed(scale):
    sub = scale.pack
    (job,) = set(sub.job_ids)
    runs = {e["run"]: Path(e["run_dir"]) for e in sub.trains}
    assert len(sub.trains) == 3 and all(e["pack"] == [x["run"] for x in sub.trains] for e in sub.trains), sub.trains
    oom = next(r for name, r in runs.items() if name.endswith("_600"))
    others = [r for r in runs.values() if r != oom]
    t0 = time.time()
    final = wait_terminal([job], 900, list(runs.values()))[job]
    timing("pack of 3 runs (one retried for memory, all requeued once)", time.time() - t0)
    assert scale.drivers["pack"].what == "acted", scale.drivers["pack"].what
    assert final["state"] == "COMPLETED" and int(final["restarts"]) == 1, final
    logs = {}
    for name, run in runs.items():
        assert metric_steps(run) == list(range(1, 49)), (name, metric_steps(run))  # every step once,
        assert not read_jsonl(run / "metrics_discarded.jsonl"), name  # none trained twice
        assert json.loads((run / "eval_results.json").read_text())["step"] == 48
        assert [c.name for c in list_checkpoints(run / "checkpoints")][-1] == "step_000048"
        assert [e["restarts"] for e in events(run, "start")][-1] == 1
        # told of the requeue. The run restarted for memory may still have been loading (srun passed
        # SIGTERM on before the controller could: exit 143, nothing to save), or its new step may not
        # have launched at all (the requeue revoked the job's credential: srun exits 168, seen in CI
        # on 2026-12-07); either way it ended without being given up, and the requeue started it again
        stopped = [e for e in events(run, "run_exit") if e.get("restarts") == 0]
        assert events(run, "sigterm_forwarded") or (run == oom and stopped and not events(run, "gave_up")), events(run)
        log = (run / "logs" / "submitit" / f"{job}_0_log.out").read_text()
        assert f"[grpo {name}] step 48/48" in log and all(f"[grpo {o}]" not in log for o in runs if o != name)
        logs[name] = log
    # stepped down alone, once, and it stays down after the requeue
    attempts = oom_attempts(oom)
    assert attempts[0] == (0, 4, "oom_killed") and attempts[-1] == (1, 2, "completed"), attempts
    assert {a[:2] for a in attempts[1:]} == {(1, 2)}, attempts
    for run in others:
        assert [a["outcome"] for a in read_jsonl(run / "attempts.jsonl")] == ["stopped", "completed"]
        resumed = re.findall(r"resuming from step (\d+)", logs[run.name])
        assert resumed and 9 <= int(resumed[0]) < 48, f"{run.name} did not resume mid-run after the requeue: {resumed}"
    steps = sacct_steps(scale.env, job)
    assert [s[1] for s in steps if s[2] == "OUT_OF_MEMORY"] == [oom.name], steps
    rows = json.loads(run_module("finellama_rl.status", [str(sub.sweep), "--json"], scale.env).stdout)
    assert {r["state"] for r in rows} == {"COMPLETED"} and all(len(r["pack"]) == 3 for r in rows), rows


# --- one run on two nodes --------------------------------------------------------------------------
def one_process(algo: str, root: Path) -> Path:
    """The same run in one process (same global batch, sampled in two calls of 4 like the two ranks)."""
    from finellama_rl.compose import load_config
    from finellama_rl.trainers.run import run_training

    torch.set_num_threads(1)
    run = root / f"one-{algo}"
    cfg = load_config(["experiment=smoke", *[a for a in NODES if not a.startswith(("hardware.nodes", "hardware.slurm"))],
                       *ALGO[algo], "trainer.generation_batch=4", f"run.results_dir={root}", f"run.dir={run}"])
    assert run_training(cfg) == 0
    return run


def assert_matches_one_process(two: Path, one: Path) -> None:
    from safetensors.torch import load_file

    a, b = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert any(r["train/reward_mean"] > 0 for r in b), "the test needs rewards with variance"
    for key in KEYS:
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-3, abs=1e-6), key
    ckpt_two, ckpt_one = list_checkpoints(two / "checkpoints")[-1], list_checkpoints(one / "checkpoints")[-1]
    digests = read_state(ckpt_two)["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # identical adapters on both nodes
    w2, w1 = load_file(str(ckpt_two / "adapter_model.safetensors")), load_file(str(ckpt_one / "adapter_model.safetensors"))
    for name, w in w1.items():
        assert torch.allclose(w2[name], w, rtol=1e-3, atol=1e-6), name


def test_grpo_on_two_nodes_matches_one_process(scale, tmp_path):
    sub = scale.nodes["grpo"]
    (job,) = sub.job_ids
    final = wait_terminal([job], 900, [sub.run_dir])[job]
    assert final["state"] == "COMPLETED", job_logs(sub.run_dir)
    log = job_logs(sub.run_dir, tail=0)
    assert "0: " in log and "1: " in log and "data parallel over 2 processes (torchrun, 2 node(s))" in log
    assert "rank 0 of 2 joined the process group (gloo)" in log
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NNodes,NodeList", "-j", job], capture_output=True,
                           text=True, env=scale.env).stdout.split()
    assert nodes and nodes[0].startswith("2|"), nodes
    assert_matches_one_process(sub.run_dir, one_process("grpo", tmp_path))


def test_ppo_on_two_nodes_is_requeued_on_the_warning_resumes_and_matches_one_process(scale, tmp_path):
    sub = scale.nodes["ppo"]
    (job,) = sub.job_ids
    run = sub.run_dir
    final = wait_terminal([job], 900, [run])[job]
    assert scale.drivers["ppo"].what == "acted", scale.drivers["ppo"].what  # the warning SLURM sends before the time limit
    assert final["state"] == "COMPLETED" and int(final["restarts"]) == 1, (final, job_logs(run))
    assert events(run, "signal")[0]["code"] == 75, events(run)  # both nodes saved and stopped at one step
    resumed = re.findall(r"resuming from step (\d+)", job_logs(run, tail=0))
    assert resumed and 3 <= int(resumed[0]) < 12, resumed
    assert metric_steps(run) == list(range(1, 13))  # every step once
    assert not read_jsonl(run / "metrics_discarded.jsonl"), "a signalled run lost steps"
    assert_matches_one_process(run, one_process("ppo", tmp_path))


def test_dry_run_shows_the_array_line_and_the_node_count(env, tmp_path):
    proc = run_module("finellama_rl.launch", ["launcher=slurm", "experiment=smoke", "dry_run=true", *ARRAY, *ONE_CPU,
                                              f"run.results_dir={tmp_path}"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#SBATCH --array=0-5%2") == 1 and "# task 5: run " in proc.stdout, proc.stdout
    assert "sbatch --test-only accepts all 1 job script(s)" in proc.stdout
    nodes = run_module("finellama_rl.launch", ["launcher=slurm", "experiment=smoke", "dry_run=true", *NODES,
                                               f"run.results_dir={tmp_path}"], env)
    assert nodes.returncode == 0, nodes.stderr
    assert "#SBATCH --nodes=2" in nodes.stdout and "hardware=cpu nodes=2" in nodes.stdout
    assert "--nodes=1 --ntasks=1" in nodes.stdout  # the controller runs once; it starts one task per node
    assert not list(tmp_path.rglob("ledger.jsonl"))
