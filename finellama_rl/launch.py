"""Sweeps from one command: compose and check every run first, then run them.

    python -m finellama_rl.launch -m trainer=ppo,grpo hardware=a100_80   # Qwen2.5-3B on GSM8K, SLURM
    python -m finellama_rl.launch experiment=smoke                       # tiny model, CPU (make run)
    python -m finellama_rl.launch -m trainer=ppo,grpo experiment=smoke

Every combination is composed, resolved and validated before anything runs, so a
typo in the third run of a sweep stops the sweep with exit code 2 before the first
starts. Then every run is checked where it will run: its folder is free (no live
lock, no pending or running job of it in the ledger), model and data reachable, and
on SLURM `sbatch --test-only` accepts its exact script. A run folder that already holds
a run is resumed with its own config.yaml: a relaunch that would change what it trains
stops with exit 2 naming the settings (finellama_rl/resume.py). Each run folder is
reserved (its launch.lock) before the last check and the submission, so of two launches
started together the second stops with exit 2. Submission is all or
nothing: if sbatch still refuses a job, the jobs this command submitted are
cancelled and what it wrote is removed. Locally, runs execute one after another as
`python -m finellama_rl.train` subprocesses (the same entry the jobs use). This
module never imports torch: a 100-run sweep is planned in seconds.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from finellama_rl.config import Device, Launcher
from finellama_rl.errors import ConfigError, UsageError
from finellama_rl.console import warn
from finellama_rl.login.sweep import (
    PlannedRun, Reservations, budget_warnings, check_folders_free, ledger_path, plan_runs, reserve_sweep,
)

if TYPE_CHECKING:
    from finellama_rl.login.units import JobUnit


def gpu_present() -> Tuple[bool, str]:
    """(present, why not) for the machine launch runs on; never imports torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False, "CUDA_VISIBLE_DEVICES hides every GPU"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and "GPU" in out.stdout:
                return True, ""
            return False, f"nvidia-smi -L found no GPU ({(out.stderr or out.stdout).strip()[:100] or 'no output'})"
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"nvidia-smi failed ({exc})"
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True, ""
    return False, "no NVIDIA GPU here (nvidia-smi not found)"


def use_slurm(runs: List[PlannedRun]) -> bool:
    from finellama_rl.login.preflight import slurm_usable

    launcher = runs[0].cfg.launcher
    if any(r.cfg.launcher != launcher for r in runs):
        raise UsageError("launcher cannot be swept; choose one of auto|local|slurm")
    if launcher == Launcher.local:
        return False
    if launcher == Launcher.slurm and runs[0].cfg.dry_run:
        return True  # preview the exact submission text, SLURM installed or not
    usable, why = slurm_usable()
    if runs[0].cfg.dry_run and not usable and any(r.cfg.hardware.device == Device.cuda for r in runs):
        return True  # a preview anywhere: a GPU sweep as the SLURM jobs it would be (what was not checked is listed)
    if launcher == Launcher.slurm and not usable:
        raise ConfigError("launcher", f"launcher=slurm but {why}; use launcher=local or run on a login node")
    if launcher == Launcher.auto and not usable and "not on PATH" not in why:
        gpu = next((r for r in runs if r.cfg.hardware.device == Device.cuda), None)
        if gpu is not None:
            raise ConfigError("launcher", f"sbatch is installed but SLURM does not answer ({why}); refusing to run "
                              f"hardware={gpu.cfg.hardware.name} on this machine. Retry when SLURM answers, or set "
                              "launcher=local on a machine with a GPU")
        print(f"note: sbatch is installed but SLURM does not answer ({why}); running locally", flush=True)
    return usable


def check_local_gpu(runs: List[PlannedRun], unchecked: Optional[List[str]] = None) -> None:
    """A local run of a CUDA profile needs a GPU here; say so before anything starts (a dry
    run lists it under what it could not check)."""
    gpu_runs = [r for r in runs if r.cfg.hardware.device == Device.cuda]
    if not gpu_runs:
        return
    present, why = gpu_present()
    if not present:
        r = gpu_runs[0]
        error = ConfigError("hardware", f"hardware={r.cfg.hardware.name} needs a CUDA GPU but {why}; on a SLURM login node "
                            f"use launcher=slurm, on this machine use hardware=cpu (e.g. experiment=smoke) [in {r.label}]")
        if unchecked is None:
            raise error
        unchecked.append(str(error))


def preflight(runs: List[PlannedRun], slurm: bool, unchecked: Optional[List[str]] = None) -> None:
    """Every check for every run before anything is submitted or run. With `unchecked` (a
    dry run) what this machine cannot check (no GPU, no SLURM, a model or dataset out of
    reach) is listed there instead of stopping; every other problem still stops (exit 2)."""
    from finellama_rl.login.preflight import check_run, slurm_partitions, slurm_usable

    if not slurm:
        check_local_gpu(runs, unchecked)
        multi = next((r for r in runs if r.cfg.hardware.nodes > 1), None)
        if multi is not None:
            raise ConfigError("hardware.nodes", f"hardware.nodes={multi.cfg.hardware.nodes} runs one job on several nodes "
                              f"through SLURM; use launcher=slurm on a login node, or hardware.nodes=1 here [in {multi.label}]")
    partitions = slurm_partitions() if slurm and shutil.which("sinfo") else None
    if slurm and unchecked is not None and not slurm_usable()[0]:
        unchecked.append(f"SLURM: {slurm_usable()[1]}: sbatch --test-only (gres, partition, account, QOS) and partitions")
    elif slurm and partitions is None:
        print("note: sinfo is not on PATH: partitions not checked", flush=True)
    for r in runs:
        notes: List[str] = []
        try:
            check_run(r.cfg, slurm, partitions, notes if unchecked is not None else None)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in {r.label}]") from None
        if unchecked is not None:
            unchecked.extend(n for n in notes if n not in unchecked)
    check_folders_free(runs)


def run_local(runs: List[PlannedRun]) -> int:
    """One after another, each a fresh `finellama_rl.train` process."""
    results = []
    for r in runs:
        print(f"=== {r.label} -> {r.cfg.run.dir}", flush=True)
        env = os.environ.copy()
        if r.cfg.hardware.device != Device.cuda:  # one thread per process on CPU unless you set it (login/controller.job_threads)
            env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", *r.train_argv()], env=env)
        results.append((r, proc.returncode))
    print_table(["run", "trainer", "model", "hardware", "exit", "results"],
                [[r.cfg.run.name, r.cfg.trainer.algo.value, r.cfg.model.name, r.cfg.hardware.name, str(code), r.cfg.run.dir] for r, code in results])
    failed = [code for _, code in results if code]
    return failed[0] if failed else 0


def print_table(header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip(), flush=True)


def job_chunks(runs: List[PlannedRun], ask_slurm: bool = True) -> List[List["JobUnit"]]:
    """The sweep as SLURM will see it: runs packed per hardware.runs_per_gpu, then one
    array per resource request (chunks of at most MaxArraySize tasks; login/units.py)."""
    from finellama_rl.login.scheduler import max_array_size
    from finellama_rl.login.units import group_units, plan_units

    return group_units(plan_units(runs), max_array_size() if ask_slurm else 1001)


def test_with_sbatch(chunks: List[List["JobUnit"]]) -> None:
    """`sbatch --test-only` for every job's or array's exact script (gres, constraint,
    memory, partition, time, account, QOS, nodes, array size), in parallel; nothing is queued."""
    from concurrent.futures import ThreadPoolExecutor

    from finellama_rl.login import slurm
    from finellama_rl.login.units import chunk_name

    def check(item):
        i, chunk = item
        return slurm.test_text(slurm.units_preview(chunk, chunk[0].folder(alone=len(chunk) == 1), chunk_name(chunk, i)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(check, enumerate(chunks)))
    for chunk, error in zip(chunks, errors):
        if error:
            what = chunk[0].label if len(chunk) == 1 else f"the array of {len(chunk)} jobs from {chunk[0].label}"
            raise ConfigError(slurm.sbatch_error_key(error), f"sbatch --test-only refused {what}: {error}; "
                              "nothing was submitted")


def submit_slurm(runs: List[PlannedRun], chunks: List[List["JobUnit"]], created: Sequence[Path] = ()) -> int:
    from finellama_rl.login.submission import Submission

    with Submission(runs, ledger_path, created) as sub:
        rows = [row for i, chunk in enumerate(chunks) for row in sub.submit_chunk(chunk, i)]
    print_table(["run", "job", "hardware", "partition", "start rung", "log"], rows)
    arrays = sum(1 for c in chunks if len(c) > 1)
    print(f"submitted {len(runs)} run(s) as {len(chunks)} job(s){f' ({arrays} of them arrays)' if arrays else ''}",
          flush=True)
    print(f"status: python -m finellama_rl.status {shlex.quote(str(ledger_path(runs[0].cfg).parent))}", flush=True)
    return 0


def _print_unchecked(unchecked: Sequence[str]) -> None:
    if unchecked:
        print("not checked on this machine (a real launch checks them where it runs):\n"
              + "\n".join(f"  - {line}" for line in unchecked))


def describe_run(r: PlannedRun) -> str:
    c = r.cfg
    model = c.model.path or ("tiny, random init" if c.model.tiny else c.model.hub_id)
    nodes = f" nodes={c.hardware.nodes}" if c.hardware.nodes > 1 else ""
    return (f"=== {r.label}\nrun folder: {c.run.dir}\nstart rung: {r.start_rung} ({r.rung_reason})\n"
            f"config: model={c.model.name} ({model}) trainer={c.trainer.algo.value} data={c.data.source.value} "
            f"hardware={c.hardware.name}{nodes} max_steps={c.trainer.max_steps}")


def dry_run(runs: List[PlannedRun], slurm_mode: bool, unchecked: Sequence[str] = ()) -> int:
    """Print every run (model, trainer, data, hardware, each job's or array's sbatch script and
    srun steps, or the local command) and what this machine could not check; submit nothing."""
    from finellama_rl.login.preflight import slurm_usable

    for r in runs:
        print(describe_run(r))
        if not slurm_mode:
            print(f"would run locally: {shlex.join([sys.executable, '-m', 'finellama_rl.train', *r.train_argv()])}\n")
    if not slurm_mode:
        _print_unchecked(unchecked)
        print(f"dry run: {len(runs)} run(s), nothing submitted", flush=True)
        return 0
    from finellama_rl.login import slurm
    from finellama_rl.login.units import chunk_name

    usable = slurm_usable()[0]
    chunks = job_chunks(runs, ask_slurm=usable)
    for i, chunk in enumerate(chunks):
        kind = f"array of {len(chunk)} tasks" if len(chunk) > 1 else "job"
        print(f"=== {kind} {chunk_name(chunk, i)}")
        print(slurm.units_preview(chunk, chunk[0].folder(alone=len(chunk) == 1), chunk_name(chunk, i)))
        for task, unit in enumerate(chunk):
            for step in unit.steps():
                share = f", GPU memory fraction {step.gpu_fraction}" if step.gpu_fraction else ""
                print(f"# {f'task {task}: ' if len(chunk) > 1 else ''}run {step.name}: an srun step of {step.cpus} CPU(s), "
                      f"{step.mem_mb} MB{share}, {step.nodes} node(s)\n"
                      f"# job: {shlex.join(['python', '-m', 'finellama_rl.train', *step.argv])}")
        print()
    if usable:
        test_with_sbatch(chunks)
        print(f"sbatch --test-only accepts all {len(chunks)} job script(s)")
    _print_unchecked(unchecked)
    print(f"dry run: {len(runs)} run(s) as {len(chunks)} job(s), nothing submitted", flush=True)
    return 0


def main(argv: List[str]) -> int:
    runs = plan_runs(argv)
    for line in budget_warnings(runs):  # evaluation budget or prompt format other than training's: say so
        warn(line)
    slurm_mode = use_slurm(runs)
    dry = runs[0].cfg.dry_run
    reserve_sweep(runs, create=False)  # the folder names the checks and the dry run show
    unchecked: Optional[List[str]] = [] if dry else None
    preflight(runs, slurm_mode, unchecked)
    if dry:
        return dry_run(runs, slurm_mode, unchecked or [])
    if not slurm_mode:
        with Reservations(runs, reserve_sweep(runs, create=True)):  # one launch per run folder at a time
            return run_local(runs)
    chunks = job_chunks(runs)
    test_with_sbatch(chunks)  # before anything is written
    try:
        created = reserve_sweep(runs, create=True)
    except OSError as exc:
        raise ConfigError("run.results_dir", f"cannot create the sweep folder: {exc}") from None
    with Reservations(runs, created) as held:  # the second of two simultaneous launches stops here
        return submit_slurm(runs, chunks, held.created)


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main, overrides=True)
