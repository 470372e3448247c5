"""Where a sweep stands: one row per run from the ledger, the scheduler and the run folders.

    python -m finellama_rl.status results/<sweep>            # table
    python -m finellama_rl.status results/<sweep> --json     # one JSON list, for scripts
    python -m finellama_rl.status results/<sweep> --cancel   # scancel its pending/running jobs
    python -m finellama_rl.status results/<sweep> --cancel --run <run>   # that run's only (its array task)

Runs come from <sweep>/ledger.jsonl (written by `finellama_rl.launch`, and in older
sweeps by the watchdogs: the latest training job of each run is its row; --cancel
cancels every pending or running job of the sweep, older watchdogs included) plus any run folder with a config.yaml (local runs have no ledger). A run
that is a task of a job array shows `<array>_<task>`, and --cancel --run cancels that
task alone (its siblings go on); runs packed in one job share it (cancelling one
cancels the pack), and a packed run that has finished shows `done` while the pack runs.
Malformed files (not UTF-8, missing keys, wrong types) are skipped with one warning;
an accuracy outside [0, 1] is refused, not shown. The scheduler state comes from sacct
through `finellama_rl.login.slurm.job_states` when sacct is on PATH; without it the
state comes from the files: `done` when eval_results.json exists, else `unknown`.
Requeues are the larger of sacct's count and the 'requeue' events in
logs/job_events.jsonl. No torch import: this answers in a second on a login node.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from finellama_rl.errors import UsageError
from finellama_rl.results import RunPaths, SweepPaths, iter_run_dirs
from finellama_rl.fileio import config_value, fraction_or_none, number_or_none, read_json_object, read_jsonl, read_run_config_data, warn
from finellama_rl.errors import RunConfigUnreadable

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
    accuracy: Optional[float] = None
    """The final evaluation's headline: its protocol's primary scorer (eval files of schema 2; strict for schema 1)."""
    scorer: Optional[str] = None
    strict: Optional[float] = None
    lenient: Optional[float] = None
    attempts: Optional[int] = None
    pack: List[str] = field(default_factory=list)
    """The runs that share this run's job (hardware.runs_per_gpu), this one included."""
    jobs: List[str] = field(default_factory=list)
    """Every job of the run in the ledger (training jobs, watchdogs, resubmissions)."""
    active_jobs: List[str] = field(default_factory=list)
    """Those of `jobs` that are pending or running (what --cancel cancels)."""
    gave_up: bool = False
    """The job's controller gave this run up (it failed; its pack went on without it)."""

    @property
    def active(self) -> bool:
        return bool(self.active_jobs) or (self.job_id is not None and self.state in ACTIVE_STATES)


LEDGER_ENTRY = {"run": str, "job_id": (str, int)}


def find_runs(sweep: Path) -> Dict[str, RunStatus]:
    """{run name: RunStatus with run_dir, latest training job and every job id}: ledger
    entries, then run folders that the ledger does not name (local runs)."""
    runs: Dict[str, RunStatus] = {}
    for entry in read_jsonl(SweepPaths(sweep).ledger, require=LEDGER_ENTRY):
        name, job = entry["run"], str(entry["job_id"])
        run_dir = entry.get("run_dir") if isinstance(entry.get("run_dir"), str) else str(sweep / name)
        status = runs.setdefault(name, RunStatus(name, run_dir))
        status.jobs.append(job)
        if entry.get("kind", "train") == "train":  # the row shows the latest training job
            status.job_id, status.run_dir = job, run_dir
            pack = entry.get("pack")
            status.pack = [str(p) for p in pack] if isinstance(pack, list) else []
    known = {Path(r.run_dir).resolve() for r in runs.values()}
    for run_dir in iter_run_dirs(sweep):
        if run_dir.resolve() not in known:
            runs.setdefault(run_dir.name, RunStatus(run_dir.name, str(run_dir)))
    return runs


def read_max_steps(config: Path) -> Optional[int]:
    """trainer.max_steps from a run's config.yaml (read as plain data: no interpolation)."""
    if not config.exists():
        return None
    try:
        value = config_value(read_run_config_data(config, escape=False), "trainer.max_steps")
    except RunConfigUnreadable as exc:
        warn(f"{exc}; step total not shown")
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_accuracy(path: Path) -> Tuple[Optional[float], Optional[float]]:
    """(strict, lenient) from an eval file; out-of-range or malformed values are refused."""
    doc = read_json_object(path, "its accuracy", require={"accuracy": dict})
    if doc is None:
        return None, None
    return tuple(fraction_or_none(doc["accuracy"].get(k), f"{path}: accuracy.{k}") for k in ("strict", "lenient"))


def read_primary_accuracy(path: Path, known: Dict[str, Optional[float]]) -> Tuple[Optional[float], Optional[str]]:
    """(accuracy, "protocol/scorer") of an eval file's primary scorer (finellama_rl/eval/schema.py);
    `known` holds values already read (strict, lenient), so each is checked and warned about once."""
    from finellama_rl.eval import schema

    doc = read_json_object(path, "its accuracy", require={"accuracy": dict}, quiet=True)
    if doc is None:
        return None, None
    scorer = schema.primary_scorer(doc)
    value = known[scorer] if scorer in known else fraction_or_none(doc["accuracy"].get(scorer), f"{path}: accuracy.{scorer}")
    return value, f"{schema.protocol_name(doc)}/{scorer}"


def fill_from_files(status: RunStatus) -> RunStatus:
    """Progress, reward, accuracy, attempts and requeue events from the run folder."""
    paths = RunPaths(Path(status.run_dir))
    status.max_steps = read_max_steps(paths.config)
    metrics = read_jsonl(paths.metrics, require={"step": int})
    if metrics:
        status.last_step = max(r["step"] for r in metrics)
        rewards = [r for r in metrics if "train/reward_mean" in r]
        if rewards:
            last = max(rewards, key=lambda r: r["step"])
            status.last_reward = number_or_none(last["train/reward_mean"], f"{paths.metrics}: train/reward_mean")
    if paths.eval_results.exists():
        status.strict, status.lenient = read_accuracy(paths.eval_results)
        status.accuracy, status.scorer = read_primary_accuracy(paths.eval_results, {"strict": status.strict, "lenient": status.lenient})
    if paths.attempts.exists():
        status.attempts = len(read_jsonl(paths.attempts))
    events = read_jsonl(paths.job_events, require={"event": str})
    status.requeues = sum(1 for e in events if e["event"] == "requeue")
    status.gave_up = any(e["event"] == "gave_up" and str(e.get("job_id")) == status.job_id for e in events)
    if paths.eval_results.exists():
        status.state = "done"
    return status


def sacct_states(job_ids: List[str]) -> Dict[str, Dict[str, str]]:
    """Scheduler states when SLURM accounting is here, else {} (states from files)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    from finellama_rl.login import scheduler

    return scheduler.job_states(job_ids)


def collect(sweep: Path, states: Optional[StatesFn] = None) -> List[RunStatus]:
    """Every run of the sweep, files first, then the scheduler's word on its jobs."""
    if not sweep.is_dir():
        raise UsageError(f"{sweep} is not a folder; pass a sweep folder such as results/<date-time>")
    runs = [fill_from_files(r) for r in find_runs(sweep).values()]
    if not runs:
        raise UsageError(f"{sweep} has no ledger.jsonl and no run folders with config.yaml; "
                         "pass the sweep folder that finellama_rl.launch printed")
    known = (states or sacct_states)(sorted({j for r in runs for j in r.jobs}))
    for r in runs:
        info = known.get(r.job_id or "")
        if info:
            done = r.state == "done"
            r.state = info.get("state", r.state)
            r.requeues = max(r.requeues, _as_int(info.get("restarts")))
            if len(r.pack) > 1:  # the job is the pack's: this run's own outcome says more
                r.state = pack_member_state(r.state, done, r.gave_up)
        r.active_jobs = [j for j in r.jobs if (known.get(j) or {}).get("state") in ACTIVE_STATES]
    return runs


def pack_member_state(job_state: str, done: bool, gave_up: bool) -> str:
    """A packed run's state: `done` while its pack still trains the others, COMPLETED once
    the job ended (whatever a sibling did), FAILED when the controller gave it up."""
    if done:
        return "done" if job_state in ACTIVE_STATES else "COMPLETED"
    return "FAILED" if gave_up else job_state


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
    header = ["run", "job", "state", "requeues", "step", "reward", "accuracy", "scored by", "strict", "lenient", "attempts"]
    rows = [header]
    for r in runs:
        step = f"{'-' if r.last_step is None else r.last_step}/{'?' if r.max_steps is None else r.max_steps}"
        rows.append([r.run, r.job_id or "-", r.state, str(r.requeues), step, _fmt(r.last_reward),
                     _fmt(r.accuracy, pct=True), r.scorer or "-", _fmt(r.strict, pct=True), _fmt(r.lenient, pct=True), "-" if r.attempts is None else str(r.attempts)])
    return rows


def print_table(rows: List[List[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip(), flush=True)


def cancel_active(runs: List[RunStatus], cancel_fn: Optional[Callable[[List[str]], None]] = None) -> List[RunStatus]:
    """scancel every pending or running job of these runs (training jobs, older
    watchdogs and resubmissions, older relaunches; an array task by `<array>_<task>`, so
    its siblings go on); returns the runs that had one."""
    active = [r for r in runs if r.active]
    ids = sorted({j for r in active for j in (r.active_jobs or [r.job_id])})
    if ids:
        if cancel_fn is None:
            from finellama_rl.login import scheduler

            cancel_fn = scheduler.cancel
        cancel_fn(ids)
    return active


def select_runs(runs: List[RunStatus], names: Optional[List[str]]) -> List[RunStatus]:
    """The runs --run names (all without --run); UsageError naming the runs there are."""
    if not names:
        return runs
    unknown = [n for n in names if n not in {r.run for r in runs}]
    if unknown:
        raise UsageError(f"no run {', '.join(unknown)} in this sweep; its runs: {', '.join(r.run for r in runs)}")
    return [r for r in runs if r.run in names]


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finellama_rl.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep folder (results/<date-time>) that finellama_rl.launch printed")
    parser.add_argument("--cancel", action="store_true", help="scancel the sweep's pending and running jobs")
    parser.add_argument("--run", action="append", metavar="NAME",
                        help="with --cancel: only this run's jobs (repeatable); a packed run cancels its whole pack")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser.parse_args(argv)


def main(argv: List[str], states: Optional[StatesFn] = None) -> int:
    args = parse_args(argv)
    if args.run and not args.cancel:
        raise UsageError("--run chooses what --cancel cancels; add --cancel")
    runs = collect(Path(args.sweep), states)
    chosen = select_runs(runs, args.run) if args.cancel else []
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=2), flush=True)
    else:
        print_table(table_rows(runs))
    if args.cancel:
        cancelled = cancel_active(chosen)
        ids = {j for r in cancelled for j in (r.active_jobs or [r.job_id])}
        names = ", ".join(f"{r.run} (job {', '.join(j for j in (r.active_jobs or [r.job_id]))}, {r.state}"
                          f"{', with its pack: ' + ' '.join(p for p in r.pack if p != r.run) if len(r.pack) > 1 else ''})"
                          for r in cancelled)
        print(f"cancelled {len(ids)} job(s){': ' + names if names else ''}", flush=True,
              file=sys.stderr if args.json else sys.stdout)  # keep --json output parseable
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
