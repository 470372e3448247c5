"""How a sweep becomes SLURM jobs, without a cluster: array task references, packs
(hardware.runs_per_gpu), one array per resource request chunked at MaxArraySize, the
array and multi-node scripts as sbatch gets them, the controller's srun step, and the
scheduler's answers for array tasks (squeue -r, sacct) read from fake binaries."""
from __future__ import annotations

import os

import pytest
from conftest import fake_binaries, path_without_slurm

from finellama_rl.errors import ConfigError
from finellama_rl.fileio import append_jsonl, read_jsonl
from finellama_rl.login import controller, scheduler, slurm
from finellama_rl.login.resubmit import log_says_oom
from finellama_rl.login.sweep import plan_runs, reserve_sweep
from finellama_rl.login.units import chunk_name, group_units, plan_units
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import array_of, job_ref
from finellama_rl.status import pack_member_state, select_runs, RunStatus

CPU = ["experiment=smoke", "hardware.slurm.cpus_per_task=2", "hardware.slurm.mem_gb=6"]


def planned(tmp_path, *overrides):
    runs = plan_runs(["-m", *CPU, f"run.results_dir={tmp_path}", "run.sweep=s", *overrides])
    reserve_sweep(runs, create=False)
    return runs


def test_an_array_task_is_named_array_underscore_task_never_by_its_raw_id():
    # the task that starts last gets the array id as its own SLURM_JOB_ID (measured): never use it
    task = {"SLURM_JOB_ID": "120", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3"}
    assert job_ref(task) == "120_3" and job_ref({"SLURM_JOB_ID": "77"}) == "77" and job_ref({}) is None
    assert array_of("120_3") == "120" and array_of("77") is None


def test_runs_of_one_request_form_one_array_and_other_requests_their_own(tmp_path):
    runs = planned(tmp_path, "trainer.seed=1,2,3", "hardware.slurm.mem_gb=2,3")
    chunks = group_units(plan_units(runs), max_array=1001)
    assert [[u.runs[0].index for u in c] for c in chunks] == [[0, 2, 4], [1, 3, 5]]  # launch order kept
    assert [chunk_name(c, i) for i, c in enumerate(chunks)] == ["fl-s-array0", "fl-s-array1"]
    small = group_units(plan_units(runs), max_array=2)  # MaxArraySize: chunks of at most 2 tasks
    assert [[u.runs[0].index for u in c] for c in small] == [[0, 2], [4], [1, 3], [5]]
    assert chunk_name(small[1], 1) == "fl-s-grpo-tiny-cpu-seed_3-mem_gb_2"  # a chunk of one is a plain job
    alone = group_units(plan_units(planned(tmp_path / "b", "trainer.seed=1,2", "hardware.slurm.arrays=false")), 1001)
    assert [len(c) for c in alone] == [1, 1]


def test_the_array_script_throttles_and_names_logs_by_array_and_task(tmp_path, no_slurm_path):
    runs = planned(tmp_path, "trainer.seed=1,2,3,4,5,6", "hardware.slurm.array_parallelism=2")
    (chunk,) = group_units(plan_units(runs), 1001)
    folder = chunk[0].folder(alone=False)
    text = slurm.units_preview(chunk, folder, chunk_name(chunk, 0))
    assert "#SBATCH --array=0-5%2" in text and f"#SBATCH --output={folder}/%A_%a_0_log.out" in text, text
    assert folder == tmp_path / "s" / "logs" / "submitit" and "#SBATCH --job-name=fl-s-array0" in text
    one = planned(tmp_path / "one")
    (single,) = group_units(plan_units(one), 1001)
    plain = slurm.units_preview(single, single[0].folder(alone=True), chunk_name(single, 0))
    assert "--array" not in plain and "/s/grpo-tiny-cpu/logs/submitit/%j_0_log.out" in plain


def test_a_run_on_two_nodes_asks_for_two_and_runs_its_controller_once(tmp_path, no_slurm_path):
    runs = planned(tmp_path, "hardware.nodes=2", "hardware.processes=1")
    (chunk,) = group_units(plan_units(runs), 1001)
    text = slurm.units_preview(chunk, chunk[0].folder(alone=True), chunk_name(chunk, 0))
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    command = text.splitlines()[text.splitlines().index("# command") + 2]
    assert command.startswith("srun --unbuffered") and "--nodes=1 --ntasks=1" in command
    (step,) = chunk[0].steps()
    assert step.nodes == 2 and step.cpus == 2 and step.mem_mb == 6 * 1024 - controller.CONTROLLER_MEM_MB


def test_packed_cpu_runs_share_the_jobs_cpus_and_memory(tmp_path):
    units = plan_units(planned(tmp_path, "trainer.seed=1,2,3,4", "hardware.runs_per_gpu=3"))
    assert [[r.index for r in u.runs] for u in units] == [[0, 1, 2], [3]]
    steps = units[0].steps()
    assert [s.name for s in steps] == ["grpo-tiny-cpu-seed_1", "grpo-tiny-cpu-seed_2", "grpo-tiny-cpu-seed_3"]
    assert {(s.cpus, s.mem_mb, s.own_log, s.gpu_fraction) for s in steps} == {(1, (6 * 1024 - 256) // 3, True, None)}
    assert units[0].name == "fl-s-grpo-tiny-cpu-seed_1+2" and units[0].folder(alone=True) == tmp_path / "s" / "logs" / "submitit"
    assert units[1].steps()[0].own_log is False  # a pack of one is a plain run


def test_packed_gpu_runs_get_a_share_and_a_rung_that_fits_it(tmp_path):
    base = ["hardware=a100_80", "model=qwen2.5-0.5b", "model.path=/nonexistent", "trainer.seed=1,2,3,4"]
    four = plan_units(planned(tmp_path, *base, "hardware.runs_per_gpu=4"))
    assert [len(u.runs) for u in four] == [4] and four[0].gpu_shares == [0.225] * 4
    assert {s.gpu_fraction for s in four[0].steps()} == {0.225}
    auto = plan_units(planned(tmp_path / "auto", *base, "hardware.runs_per_gpu=auto"))
    peak = auto[0].runs[0].cfg  # the planner puts a 0.5B GRPO run well under a quarter of 80 GB
    assert sum(len(u.runs) for u in auto) == 4 and len(auto[0].runs) >= 2, [len(u.runs) for u in auto]
    assert sum(auto[0].gpu_shares) == pytest.approx(0.9, abs=1e-3) and peak.hardware.gpu_mem_gb == 80
    with pytest.raises(ConfigError) as err:  # a 7B policy cannot fit 1/64 of the card at any rung
        plan_units(planned(tmp_path / "many", "hardware=a100_80", "model=qwen2.5-7b", "model.path=/nonexistent",
                           "trainer.seed=1,2", "hardware.runs_per_gpu=64"))
    assert err.value.key == "hardware.runs_per_gpu" and "python -m finellama_rl.plan" in err.value.message


@pytest.mark.parametrize("override, key", [
    ("hardware.runs_per_gpu=two", "hardware.runs_per_gpu"), ("hardware.runs_per_gpu=0", "hardware.runs_per_gpu"),
    ("hardware.nodes=0", "hardware.nodes"), ("hardware.slurm.array_parallelism=0", "hardware.slurm.array_parallelism"),
])
def test_bad_scale_out_settings_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        planned(tmp_path, override)
    assert err.value.key == key


def test_packing_is_refused_for_a_run_on_several_nodes_or_processes(tmp_path):
    with pytest.raises(ConfigError) as err:
        planned(tmp_path, "hardware.runs_per_gpu=2", "hardware.nodes=2")
    assert err.value.key == "hardware.runs_per_gpu" and "hardware.nodes=2" in err.value.message
    with pytest.raises(ConfigError) as err:
        planned(tmp_path, "hardware.runs_per_gpu=2", "hardware.processes=2", "trainer.micro_batch=2")
    assert "hardware.processes=1" in err.value.message


def test_a_run_on_two_nodes_has_twice_the_ranks(tmp_path):
    from finellama_rl.config import processes_per_node, world_size

    (r,) = planned(tmp_path, "hardware.nodes=2", "hardware.processes=2", "trainer.micro_batch=2")
    assert world_size(r.cfg.hardware) == 4 and processes_per_node(r.cfg.hardware) == 2


def test_the_controllers_step_is_an_srun_step_named_after_the_run(tmp_path, monkeypatch):
    run = controller.RunStep("grpo-a", str(tmp_path / "a"), ["trainer.seed=1"], cpus=1, mem_mb=700, nodes=2)
    monkeypatch.setenv("PATH", path_without_slurm(tmp_path / "bin"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert controller.step_command(run, None)[1:4] == ["-m", "finellama_rl.train", "trainer.seed=1"]  # no SLURM: plain
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "fake", {"srun": "exit 0"}) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    cmd = controller.step_command(run, tmp_path / "log.out")
    assert cmd[:9] == ["srun", "--overlap", "--job-name=grpo-a", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                       "--cpus-per-task=1", "--mem=700M", "--label"]
    assert f"--output={tmp_path / 'log.out'}" in cmd and "--open-mode=append" in cmd


def test_a_restarted_job_skips_the_runs_it_finished_or_gave_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "30")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    runs = [controller.RunStep(n, str(tmp_path / n), [], 1, 500) for n in ("done", "failed", "stopped", "older")]
    for name, event, code, job in [("done", "run_exit", 0, "30_1"), ("failed", "gave_up", 137, "30_1"),
                                   ("stopped", "run_exit", 75, "30_1"), ("older", "run_exit", 0, "12")]:
        RunPaths(tmp_path / name).make()
        append_jsonl(RunPaths(tmp_path / name).job_events, {"event": event, "code": code, "job_id": job})
    c = controller.Controller(runs, deadline=0.0)
    assert [r.name for r in c.pending()] == ["stopped", "older"]  # a finished run of another job trains again
    assert c.codes == {"done": 0, "failed": 137}


def test_a_step_started_as_a_signal_arrives_is_passed_the_signal(tmp_path, monkeypatch):
    """The signal handler can run after the decision to start a run (an OOM restart) and before
    its step is known to forward(): start() passes the signal on itself."""
    import signal

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(controller, "step_command", lambda run, log: ["sleep", "30"])
    run = controller.RunStep("late", str(tmp_path / "late"), [], 1, 500)
    RunPaths(tmp_path / "late").make()
    c = controller.Controller([run], deadline=0.0)
    c.stopping = c.terminated = True  # SIGTERM came while the restart was being decided
    c.start(run)
    assert c.procs["late"].wait(timeout=10) == -signal.SIGTERM
    assert [e["event"] for e in read_jsonl(run.paths.job_events)] == ["start", "sigterm_forwarded"]


def test_squeue_r_lists_every_pending_task_and_sacct_the_started_ones(tmp_path, monkeypatch):
    squeue = """case "$*" in *-r*) printf '40_2|PENDING\\n40_3|PENDING\\n40_0|RUNNING\\n41|RUNNING\\n';;
                *) printf '40_[2-3%%1]|PENDING\\n40_0|RUNNING\\n41|RUNNING\\n';; esac"""
    sacct = "printf '40_0|RUNNING|00:01:00\\n40_1|REQUEUED|00:00:30\\n40_1|COMPLETED|00:00:40\\n'"
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "bin", {"squeue": squeue, "sacct": sacct}) + os.pathsep
                       + path_without_slurm(tmp_path / "hidden"))
    ids = ["40_0", "40_1", "40_2", "40_3", "41", "40_4"]
    states = scheduler.job_states(ids)
    assert {j: s["state"] for j, s in states.items()} == {"40_0": "RUNNING", "40_1": "COMPLETED", "40_2": "PENDING",
                                                         "40_3": "PENDING", "41": "RUNNING"}
    assert states["40_1"]["restarts"] == "1" and "40_4" not in states  # cancelled while pending: known to neither


def test_the_oom_check_reads_only_what_the_failed_process_wrote(tmp_path):
    log = tmp_path / "log.out"
    log.write_text("out of memory at rung 0 in generation: caught, stepping down\n")  # the in-job ladder's
    before = log.stat().st_size
    assert not log_says_oom(log, before)
    with open(log, "a") as f:
        f.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert log_says_oom(log, before) and not log_says_oom(tmp_path / "missing.out")


def test_a_packed_runs_state_is_its_own():
    assert pack_member_state("RUNNING", done=True, gave_up=False) == "done"
    assert pack_member_state("FAILED", done=True, gave_up=False) == "COMPLETED"
    assert pack_member_state("RUNNING", done=False, gave_up=True) == "FAILED"
    assert pack_member_state("PENDING", done=False, gave_up=False) == "PENDING"


def test_cancel_of_one_run_names_the_runs_there_are():
    from finellama_rl.errors import UsageError

    runs = [RunStatus("a", "/x/a"), RunStatus("b", "/x/b")]
    assert [r.run for r in select_runs(runs, ["b"])] == ["b"] and select_runs(runs, None) == runs
    with pytest.raises(UsageError, match="no run c in this sweep; its runs: a, b"):
        select_runs(runs, ["c"])


def test_multi_node_torchrun_uses_the_static_rendezvous_on_the_given_address(monkeypatch):
    from finellama_rl.job import distributed as dist

    monkeypatch.setenv("FINELLAMA_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("FINELLAMA_MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("FINELLAMA_MASTER_PORT", "23000")
    cmd = dist.torchrun_command(["trainer=ppo"], 4, round_no=2)
    assert cmd[3:9] == ["--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--rdzv_backend=static",
                        "--master_addr=10.1.2.3", "--master_port=23002"]
    monkeypatch.setenv("FINELLAMA_NODES", "1")
    assert "--standalone" in dist.torchrun_command([], 2) and dist.node_rank() == 0
