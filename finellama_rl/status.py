"""Where a sweep stands: one row per run from the ledger, the scheduler and the run folders.

    python -m finellama_rl.status results/<sweep>            # table
    python -m finellama_rl.status results/<sweep> --json     # one JSON list, for scripts
    python -m finellama_rl.status results/<sweep> --cancel   # scancel its pending/running jobs

Runs come from <sweep>/ledger.jsonl (written by `finellama_rl.launch` for SLURM
submissions; the latest submission of each run wins) plus any run folder with a
config.yaml (local runs have no ledger). The scheduler state comes from sacct
through `finellama_rl.slurm.job_states` when sacct is on PATH; without it the
state comes from the files: `done` when eval_results.json exists, else `unknown`.
Requeues are the larger of sacct's count and the 'requeue' events in
logs/job_events.jsonl. No torch import: this answers in a second on a login node.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from finellama_rl.compose import UsageError
from finellama_rl.results import RunPaths, read_jsonl

StatesFn = Callable[[List[str]], Dict[str, Dict[str, str]]]
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")


@dataclass
class RunStatus:
    run: str
    run_dir: str
    job_id: Optional[str] = None
    state: str = "unknown"
    requeues: int = 0
    last_step: Optional[int] = None
    max_steps: Optional[int] = None
    last_reward: Optional[float] = None
    strict: Optional[float] = None
    lenient: Optional[float] = None
    attempts: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.job_id is not None and self.state in ACTIVE_STATES


def find_runs(sweep: Path) -> Dict[str, RunStatus]:
    """{run name: RunStatus with run_dir and job id}: ledger entries (latest per run),
    then run folders that the ledger does not name (local runs)."""
    runs: Dict[str, RunStatus] = {}
    for entry in read_jsonl(sweep / "ledger.jsonl"):
        if "run" in entry:
            runs[entry["run"]] = RunStatus(entry["run"], entry.get("run_dir") or str(sweep / entry["run"]),
                                           str(entry["job_id"]) if entry.get("job_id") else None)
    known = {Path(r.run_dir).resolve() for r in runs.values()}
    for cfg in sorted(sweep.glob("*/config.yaml")):
        if cfg.parent.resolve() not in known:
            runs.setdefault(cfg.parent.name, RunStatus(cfg.parent.name, str(cfg.parent)))
    return runs


def read_max_steps(config: Path) -> Optional[int]:
    if not config.exists():
        return None
    from omegaconf import OmegaConf

    try:
        return int(OmegaConf.load(config).trainer.max_steps)
    except Exception:  # a hand-edited or foreign config.yaml: leave the column empty
        return None


def fill_from_files(status: RunStatus) -> RunStatus:
    """Progress, reward, accuracy, attempts and requeue events from the run folder."""
    paths = RunPaths(Path(status.run_dir))
    status.max_steps = read_max_steps(paths.config)
    metrics = read_jsonl(paths.metrics)
    if metrics:
        status.last_step = int(max(r.get("step", 0) for r in metrics))
        rewards = [r for r in metrics if "train/reward_mean" in r]
        if rewards:
            status.last_reward = float(max(rewards, key=lambda r: r.get("step", 0))["train/reward_mean"])
    if paths.eval_results.exists():
        try:
            accuracy = json.loads(paths.eval_results.read_text())["accuracy"]
            status.strict, status.lenient = float(accuracy["strict"]), float(accuracy["lenient"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if paths.attempts.exists():
        status.attempts = sum(1 for line in paths.attempts.read_text().splitlines() if line.strip())
    events = read_jsonl(paths.logs / "job_events.jsonl")
    status.requeues = sum(1 for e in events if e.get("event") == "requeue")
    if paths.eval_results.exists():
        status.state = "done"
    return status


def sacct_states(job_ids: List[str]) -> Dict[str, Dict[str, str]]:
    """Scheduler states when SLURM accounting is here, else {} (states from files)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    from finellama_rl import slurm  # lazy: submitit is only needed where SLURM is

    return slurm.job_states(job_ids)


def collect(sweep: Path, states: Optional[StatesFn] = None) -> List[RunStatus]:
    """Every run of the sweep, files first, then the scheduler's word on its job."""
    if not sweep.is_dir():
        raise UsageError(f"{sweep} is not a folder; pass a sweep folder such as results/<date-time>")
    runs = [fill_from_files(r) for r in find_runs(sweep).values()]
    if not runs:
        raise UsageError(f"{sweep} has no ledger.jsonl and no run folders with config.yaml; "
                         "pass the sweep folder that finellama_rl.launch printed")
    known = (states or sacct_states)([r.job_id for r in runs if r.job_id])
    for r in runs:
        info = known.get(r.job_id or "")
        if info:
            r.state = info.get("state", r.state)
            r.requeues = max(r.requeues, _as_int(info.get("restarts")))
    return runs


def _as_int(value: Optional[str]) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _fmt(value: Optional[float], pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else f"{value:.4f}"


def table_rows(runs: List[RunStatus]) -> List[List[str]]:
    header = ["run", "job", "state", "requeues", "step", "reward", "strict", "lenient", "attempts"]
    rows = [header]
    for r in runs:
        step = f"{'-' if r.last_step is None else r.last_step}/{'?' if r.max_steps is None else r.max_steps}"
        rows.append([r.run, r.job_id or "-", r.state, str(r.requeues), step, _fmt(r.last_reward),
                     _fmt(r.strict, pct=True), _fmt(r.lenient, pct=True), "-" if r.attempts is None else str(r.attempts)])
    return rows


def print_table(rows: List[List[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip(), flush=True)


def cancel_active(runs: List[RunStatus], cancel_fn: Optional[Callable[[List[str]], None]] = None) -> List[RunStatus]:
    """scancel every job of the sweep that is still pending or running; returns those runs."""
    active = [r for r in runs if r.active]
    if active:
        if cancel_fn is None:
            from finellama_rl import slurm

            cancel_fn = slurm.cancel
        cancel_fn([r.job_id for r in active])
    return active


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finellama_rl.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep folder (results/<date-time>) that finellama_rl.launch printed")
    parser.add_argument("--cancel", action="store_true", help="scancel the sweep's pending and running jobs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser.parse_args(argv)


def main(argv: List[str], states: Optional[StatesFn] = None) -> int:
    args = parse_args(argv)
    runs = collect(Path(args.sweep), states)
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=2), flush=True)
    else:
        print_table(table_rows(runs))
    if args.cancel:
        cancelled = cancel_active(runs)
        names = ", ".join(f"{r.run} (job {r.job_id}, {r.state})" for r in cancelled)
        print(f"cancelled {len(cancelled)} job(s){': ' + names if names else ''}", flush=True,
              file=sys.stderr if args.json else sys.stdout)  # keep --json output parseable
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
