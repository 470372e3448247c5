"""Sweeps from one command: compose and check every run first, then run them.

    python -m finellama_rl.launch -m trainer=ppo,grpo hardware=a100_80   # Qwen2.5-3B on GSM8K, SLURM
    python -m finellama_rl.launch experiment=smoke                       # tiny model, CPU (make run)
    python -m finellama_rl.launch -m trainer=ppo,grpo experiment=smoke

Every combination is composed, resolved and validated before anything runs, so a
typo in the third run of a sweep stops the sweep with exit code 2 before the first
starts. Then every run is checked where it will run: its folder is free (no live
lock, no pending or running job of it in the ledger), model and data reachable, and
on SLURM `sbatch --test-only` accepts its exact script. Submission is all or
nothing: if sbatch still refuses a job, the jobs this command submitted are
cancelled and what it wrote is removed. Locally, runs execute one after another as
`python -m finellama_rl.train` subprocesses (the same entry the jobs use). This
module never imports torch: a 100-run sweep is planned in seconds.
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from finellama_rl.compose import expand_sweep, hydra_quote, load_config, split_argv
from finellama_rl.errors import UsageError
from finellama_rl.config import Config, Device, Launcher
from finellama_rl.errors import ConfigError
from finellama_rl.results import SweepPaths

LAUNCH_ONLY_KEYS = ("dry_run", "launcher")


@dataclass
class PlannedRun:
    index: int
    overrides: List[str]  # as typed (one combination of the sweep)
    cfg: Config
    start_rung: int = 0
    rung_reason: str = ""
    auto_sweep: Optional[str] = None  # the launch-time sweep name when run.sweep/run.dir were not typed

    @property
    def label(self) -> str:
        return f"run {self.index} ({' '.join(self.overrides) or 'defaults'})"

    def train_argv(self) -> List[str]:
        """Overrides that recreate exactly this run (used by local and SLURM jobs); the
        values launch adds are quoted for Hydra, so any folder name survives."""
        r = self.cfg.run
        kept = [o for o in self.overrides if o.split("=")[0].lstrip("+") not in LAUNCH_ONLY_KEYS]
        rung = [f"ladder.start_rung={self.start_rung}"] if self.start_rung != self.cfg.ladder.start_rung else []
        return [*kept, *rung, f"run.sweep={hydra_quote(r.sweep)}", f"run.name={hydra_quote(r.name)}",
                f"run.dir={hydra_quote(r.dir)}"]


def plan_runs(argv: Sequence[str]) -> List[PlannedRun]:
    """Compose + validate every run of the command line; ConfigError names the run."""
    from finellama_rl.plan import choose_start_rung

    multirun, overrides = split_argv(argv)
    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UsageError("comma-separated values sweep only with -m (e.g. -m trainer=ppo,grpo)")
    sweep = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    runs = []
    for i, (ovs, name_parts) in enumerate(combos):
        typed = any(o.split("=")[0] in ("run.sweep", "run.dir") for o in ovs)
        with_sweep = ovs if any(o.startswith("run.sweep=") for o in ovs) else [*ovs, f"run.sweep={sweep}"]
        try:
            cfg = load_config(with_sweep, name_parts)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in run {i} ({' '.join(ovs) or 'defaults'})]") from None
        rung, why = choose_start_rung(cfg)
        runs.append(PlannedRun(i, ovs, cfg, rung, why, auto_sweep=None if typed else sweep))
    _check_distinct(runs)
    return runs


def _check_distinct(runs: List[PlannedRun]) -> None:
    seen: Dict[str, int] = {}
    for r in runs:
        if r.cfg.run.dir in seen:
            raise ConfigError("run.name", f"runs {seen[r.cfg.run.dir]} and {r.index} would share {r.cfg.run.dir}; drop run.name/run.dir from a sweep")
        seen[r.cfg.run.dir] = r.index


def reserve_sweep(runs: List[PlannedRun], create: bool) -> List[Path]:
    """Give runs with a launch-time sweep name a sweep folder of their own: created
    exclusively (two launches in the same second get `<time>` and `<time>-2`). A dry
    run only picks the first free name. Returns the folders it created."""
    created: List[Path] = []
    for results_dir in sorted({r.cfg.run.results_dir for r in runs if r.auto_sweep}):
        group = [r for r in runs if r.auto_sweep and r.cfg.run.results_dir == results_dir]
        base, root = group[0].auto_sweep, Path(results_dir).resolve()
        if create and not root.exists():
            top = next(p for p in [root, *root.parents] if p.parent.exists())
            root.mkdir(parents=True, exist_ok=True)
            created.append(top)
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}-{n}"
            try:
                if create:
                    (root / name).mkdir()
                    created.append(root / name)
                elif (root / name).exists():
                    raise FileExistsError(name)
                break
            except FileExistsError:
                continue
        else:
            raise ConfigError("run.sweep", f"no free sweep folder name under {root} for {base}; set run.sweep")
        for r in group:
            r.cfg = replace(r.cfg, run=replace(r.cfg.run, sweep=name, dir=str(root / name / r.cfg.run.name)))
    return created


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


def check_local_gpu(runs: List[PlannedRun]) -> None:
    """A local run of a CUDA profile needs a GPU here; say so before anything starts."""
    gpu_runs = [r for r in runs if r.cfg.hardware.device == Device.cuda]
    if not gpu_runs:
        return
    present, why = gpu_present()
    if not present:
        r = gpu_runs[0]
        raise ConfigError("hardware", f"hardware={r.cfg.hardware.name} needs a CUDA GPU but {why}; on a SLURM login node "
                          f"use launcher=slurm, on this machine use hardware=cpu (e.g. experiment=smoke) [in {r.label}]")


def preflight(runs: List[PlannedRun], slurm: bool) -> None:
    """Every check for every run before anything is submitted or run."""
    from finellama_rl.login.preflight import check_run, slurm_partitions

    if not slurm:
        check_local_gpu(runs)
    partitions = slurm_partitions() if slurm and shutil.which("sinfo") else None
    if slurm and partitions is None:
        print("note: sinfo is not on PATH: partitions not checked", flush=True)
    for r in runs:
        try:
            check_run(r.cfg, slurm, partitions)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in {r.label}]") from None
    check_folders_free(runs)


def check_folders_free(runs: List[PlannedRun]) -> None:
    """One writer per run folder: refuse a folder whose lock is live or whose job (in
    the sweep's ledger: training, watchdog, resubmission) is pending or running."""
    from finellama_rl.fileio import read_jsonl
    from finellama_rl.runlock import RunFolderBusy, active_jobs, busy_hint, busy_reason

    by_dir = {str(Path(r.cfg.run.dir).resolve()): r for r in runs}
    jobs: Dict[str, List[Tuple[str, str]]] = {}  # run folder -> [(job id, kind)]
    for ledger in sorted({ledger_path(r.cfg) for r in runs}):
        for entry in read_jsonl(ledger, require={"run_dir": str, "job_id": (str, int)}):
            run_dir = str(Path(entry["run_dir"]).resolve())
            if run_dir in by_dir:
                jobs.setdefault(run_dir, []).append((str(entry["job_id"]), str(entry.get("kind", "train"))))
    active = active_jobs([j for ids in jobs.values() for j, _ in ids])
    for run_dir, r in by_dir.items():
        busy = sorted(((j, kind, active[j]) for j, kind in jobs.get(run_dir, []) if j in active),
                      key=lambda b: b[1] != "train")  # a training job before a watchdog
        if busy:
            job, kind, state = busy[0]
            what = f"job {job} of this run is {state}" if kind == "train" else f"its watchdog job {job} is {state}"
            err = RunFolderBusy(Path(run_dir), what, busy_hint(Path(run_dir), job))
            raise ConfigError(err.key, f"{err.message} [in {r.label}]")
        why = busy_reason(Path(run_dir))
        if why:
            err = RunFolderBusy(Path(run_dir), why, busy_hint(Path(run_dir), None))
            raise ConfigError(err.key, f"{err.message} [in {r.label}]")


def run_local(runs: List[PlannedRun]) -> int:
    """One after another, each a fresh `finellama_rl.train` process."""
    results = []
    for r in runs:
        print(f"=== {r.label} -> {r.cfg.run.dir}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", *r.train_argv()], env=os.environ.copy())
        results.append((r, proc.returncode))
    print_table(["run", "trainer", "model", "hardware", "exit", "results"],
                [[r.cfg.run.name, r.cfg.trainer.algo.value, r.cfg.model.name, r.cfg.hardware.name, str(code), r.cfg.run.dir] for r, code in results])
    failed = [code for _, code in results if code]
    return failed[0] if failed else 0


def print_table(header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip(), flush=True)


def ledger_path(cfg: Config) -> Path:
    return SweepPaths.of_run(Path(cfg.run.dir)).ledger


def test_with_sbatch(runs: List[PlannedRun]) -> None:
    """`sbatch --test-only` for every run's exact script (gres, constraint, memory,
    partition, time, account, QOS), in parallel; nothing is queued."""
    from concurrent.futures import ThreadPoolExecutor

    from finellama_rl.login import slurm

    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(lambda r: slurm.test_submission(r.cfg), runs))
    for r, error in zip(runs, errors):
        if error:
            raise ConfigError(slurm.sbatch_error_key(error), f"sbatch --test-only refused {r.label}: {error}; "
                              "nothing was submitted")


def submit_slurm(runs: List[PlannedRun], created: Sequence[Path] = ()) -> int:
    from finellama_rl.login.submission import Submission

    with Submission(runs, ledger_path, created) as sub:
        rows = [sub.submit(r) for r in runs]
    print_table(["run", "job", "hardware", "partition", "start rung", "log"], rows)
    print(f"status: python -m finellama_rl.status {shlex.quote(str(ledger_path(runs[0].cfg).parent))}", flush=True)
    return 0


def dry_run(runs: List[PlannedRun], slurm_mode: bool) -> int:
    from finellama_rl.login.preflight import slurm_usable

    for r in runs:
        c = r.cfg
        model = c.model.path or ("tiny, random init" if c.model.tiny else c.model.hub_id)
        print(f"=== {r.label}\nrun folder: {c.run.dir}\nstart rung: {r.start_rung} ({r.rung_reason})\n"
              f"config: model={c.model.name} ({model}) trainer={c.trainer.algo.value} data={c.data.source.value} "
              f"hardware={c.hardware.name} max_steps={c.trainer.max_steps}")
        if slurm_mode:
            from finellama_rl.login import slurm

            print(slurm.sbatch_preview(r.cfg))
            print(f"# job: {shlex.join(['python', '-m', 'finellama_rl.train', *r.train_argv()])}\n")
        else:
            print(f"would run locally: {shlex.join([sys.executable, '-m', 'finellama_rl.train', *r.train_argv()])}\n")
    if slurm_mode and slurm_usable()[0]:
        test_with_sbatch(runs)
        print(f"sbatch --test-only accepts all {len(runs)} job script(s)")
    print(f"dry run: {len(runs)} run(s), nothing submitted", flush=True)
    return 0


def main(argv: List[str]) -> int:
    runs = plan_runs(argv)
    slurm_mode = use_slurm(runs)
    dry = runs[0].cfg.dry_run
    reserve_sweep(runs, create=False)  # the folder names the checks and the dry run show
    preflight(runs, slurm_mode)
    if dry:
        return dry_run(runs, slurm_mode)
    if not slurm_mode:
        reserve_sweep(runs, create=True)
        return run_local(runs)
    test_with_sbatch(runs)  # before anything is written
    try:
        created = reserve_sweep(runs, create=True)
    except OSError as exc:
        raise ConfigError("run.results_dir", f"cannot create the sweep folder: {exc}") from None
    return submit_slurm(runs, created)


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
