"""Sweeps from one command: compose and validate every run first, then run them.

    python -m finellama_rl.launch experiment=smoke                 # one local run
    python -m finellama_rl.launch -m trainer=ppo,grpo experiment=smoke
    python -m finellama_rl.launch -m trainer=ppo,grpo hardware=a100_80 model=qwen2.5-3b

Every combination is composed, resolved and validated before anything runs, so a
typo in the third run of a sweep stops the sweep with exit code 2 before the first
starts. Locally, runs execute one after another as `python -m finellama_rl.train`
subprocesses (the same entry the sbatch scripts use). This module never imports
torch: a sweep must be planned in seconds.
"""
from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from finellama_rl.compose import UsageError, expand_sweep, load_config, split_argv
from finellama_rl.config import Config, ConfigError


LAUNCH_ONLY_KEYS = ("dry_run", "launcher")


@dataclass
class PlannedRun:
    index: int
    overrides: List[str]  # as typed (one combination of the sweep)
    cfg: Config
    start_rung: int = 0
    rung_reason: str = ""

    @property
    def label(self) -> str:
        return f"run {self.index} ({' '.join(self.overrides) or 'defaults'})"

    def train_argv(self) -> List[str]:
        """Overrides that recreate exactly this run (used by local and SLURM jobs)."""
        r = self.cfg.run
        kept = [o for o in self.overrides if o.split("=")[0].lstrip("+") not in LAUNCH_ONLY_KEYS]
        rung = [f"ladder.start_rung={self.start_rung}"] if self.start_rung != self.cfg.ladder.start_rung else []
        return [*kept, *rung, f"run.sweep={r.sweep}", f"run.name={r.name}", f"run.dir={r.dir}"]


def plan_runs(argv: Sequence[str]) -> List[PlannedRun]:
    """Compose + validate every run of the command line; ConfigError names the run."""
    multirun, overrides = split_argv(argv)
    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UsageError("comma-separated values sweep only with -m (e.g. -m trainer=ppo,grpo)")
    sweep = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    runs = []
    for i, (ovs, name_parts) in enumerate(combos):
        with_sweep = ovs if any(o.startswith("run.sweep=") for o in ovs) else [*ovs, f"run.sweep={sweep}"]
        try:
            cfg = load_config(with_sweep, name_parts)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in run {i} ({' '.join(ovs) or 'defaults'})]") from None
        from finellama_rl.plan import choose_start_rung

        rung, why = choose_start_rung(cfg)
        runs.append(PlannedRun(i, ovs, cfg, rung, why))
    _check_distinct(runs)
    return runs


def _check_distinct(runs: List[PlannedRun]) -> None:
    seen = {}
    for r in runs:
        if r.cfg.run.dir in seen:
            raise ConfigError("run.name", f"runs {seen[r.cfg.run.dir]} and {r.index} would share {r.cfg.run.dir}; drop run.name/run.dir from a sweep")
        seen[r.cfg.run.dir] = r.index


def use_slurm(runs: List[PlannedRun]) -> bool:
    from finellama_rl.config import Launcher
    from finellama_rl.preflight import slurm_usable

    launcher = runs[0].cfg.launcher
    if any(r.cfg.launcher != launcher for r in runs):
        raise UsageError("launcher cannot be swept; choose one of auto|local|slurm")
    if launcher == Launcher.local:
        return False
    usable, why = slurm_usable()
    if launcher == Launcher.slurm and not usable:
        raise ConfigError("launcher", f"launcher=slurm but {why}; use launcher=local or run on a login node")
    if launcher == Launcher.auto and not usable and "not on PATH" not in why:
        print(f"note: sbatch is installed but SLURM does not answer ({why}); running locally", flush=True)
    return usable


def preflight(runs: List[PlannedRun], slurm: bool) -> None:
    """Every check for every run before anything is submitted or run."""
    from finellama_rl.preflight import check_run, slurm_partitions

    partitions = slurm_partitions() if slurm else None
    for r in runs:
        try:
            check_run(r.cfg, slurm, partitions)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in {r.label}]") from None


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


def submit_slurm(runs: List[PlannedRun]) -> int:
    from finellama_rl import slurm

    rows = []
    for r in runs:
        Path(r.cfg.run.dir).mkdir(parents=True, exist_ok=True)
        job = slurm.submit(r.cfg, r.train_argv())
        slurm.record_submission(ledger_path(r.cfg), r.cfg, job.job_id, r.train_argv())
        if r.cfg.ladder.enabled and r.cfg.ladder.max_resubmits:
            slurm.submit_watchdog(r.cfg, job.job_id, r.train_argv(), 0)
        log = Path(r.cfg.run.dir) / "logs" / "submitit" / f"{job.job_id}_0_log.out"
        rows.append([r.cfg.run.name, job.job_id, r.cfg.hardware.name, r.cfg.hardware.slurm.partition or "(default)",
                     f"{r.start_rung} ({r.rung_reason})", str(log)])
    print_table(["run", "job", "hardware", "partition", "start rung", "log"], rows)
    print(f"status: python -m finellama_rl.status {ledger_path(runs[0].cfg).parent}", flush=True)
    return 0


def ledger_path(cfg: Config) -> Path:
    return Path(cfg.run.dir).parent / "ledger.jsonl"


def dry_run(runs: List[PlannedRun], slurm_mode: bool) -> int:
    for r in runs:
        print(f"=== {r.label}\nrun folder: {r.cfg.run.dir}\nstart rung: {r.start_rung} ({r.rung_reason})")
        if slurm_mode:
            from finellama_rl import slurm

            print(slurm.sbatch_preview(r.cfg))
            print(f"# job: python -m finellama_rl.train {' '.join(r.train_argv())}\n")
        else:
            print(f"would run locally: {sys.executable} -m finellama_rl.train {' '.join(r.train_argv())}\n")
    print(f"dry run: {len(runs)} run(s), nothing submitted", flush=True)
    return 0


def main(argv: List[str]) -> int:
    runs = plan_runs(argv)
    slurm_mode = use_slurm(runs)
    preflight(runs, slurm_mode)
    if runs[0].cfg.dry_run:
        return dry_run(runs, slurm_mode)
    return submit_slurm(runs) if slurm_mode else run_local(runs)


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
