"""Where a sweep stands: one row per run from the ledger, the scheduler and the run folders.

    python -m finellama_rl.status results/<sweep>            # table
    python -m finellama_rl.status results/<sweep> --json     # one JSON list, for scripts
    python -m finellama_rl.status results/<sweep> --cancel   # scancel its pending/running jobs
    python -m finellama_rl.status results/<sweep> --cancel --run <run>   # that run's only (its array task)

Runs come from <sweep>/ledger.jsonl (written by `finellama_rl.launch`, and in older
sweeps by the watchdogs: the latest training job of each run is its row; --cancel
cancels every pending or running job of the sweep, older watchdogs included) plus any
run folder with a config.yaml (local runs have no ledger). A run that is a task of a job
array shows `<array>_<task>`, and --cancel --run cancels that task alone (its siblings go
on); runs packed in one job share it (cancelling one cancels the pack), and a packed run
that has finished shows `done` while the pack runs.
Malformed files (not UTF-8, missing keys, wrong types, a folder in place of a file) get
one warning line each and are skipped; numbers follow the readers' rules (stats.py for
metrics.jsonl: a step outside [0, max_steps] or a reward outside what the run's reward
sources can give is unknown; eval/schema.py for eval files: an accuracy outside [0, 1] is
refused, never shown). The table's last column (other-jobs) lists each run's watchdogs (older
sweeps) and other training jobs (a duplicate launch is also called out below the table). The scheduler state comes from sacct
through `finellama_rl.login.scheduler.job_states` when sacct is on PATH; without it the
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
from typing import Callable, Dict, List, Optional

from finellama_rl.errors import UsageError
from finellama_rl.results import RunPaths, SweepPaths, iter_run_dirs
from finellama_rl.fileio import read_jsonl, read_run_config_data, warn
from finellama_rl.errors import RunConfigUnreadable
from finellama_rl.stats import REWARD_KEY, MetricLimits, read_metrics

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
    job_kinds: Dict[str, str] = field(default_factory=dict)
    """{job id: train | watchdog} from the ledger."""
    job_states: Dict[str, str] = field(default_factory=dict)
    """{job id: scheduler state} where sacct answered."""
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
        status.job_kinds[job] = str(entry.get("kind") or "train")
        if entry.get("kind", "train") == "train":  # the row shows the latest training job
            status.job_id, status.run_dir = job, run_dir
            pack = entry.get("pack")
            status.pack = [str(p) for p in pack] if isinstance(pack, list) else []
    known = {Path(r.run_dir).resolve() for r in runs.values()}
    for run_dir in iter_run_dirs(sweep):
        if run_dir.resolve() not in known:
            runs.setdefault(run_dir.name, RunStatus(run_dir.name, str(run_dir)))
    return runs


def read_limits(config: Path) -> MetricLimits:
    """trainer.max_steps and the reward range from a run's config.yaml (read as plain
    data: no interpolation); unknown when it is unreadable."""
    if not config.exists():
        return MetricLimits()
    try:
        return MetricLimits.of_config_data(read_run_config_data(config, escape=False))
    except RunConfigUnreadable as exc:
        warn(f"{exc}; step total not shown")
        return MetricLimits()


def fill_from_files(status: RunStatus) -> RunStatus:
    """Progress, reward, accuracy, attempts and requeue events from the run folder, each
    value under the readers' rules (stats.read_metrics, eval/schema.read_eval_document)."""
    from finellama_rl.eval import schema
    from finellama_rl.ladder.attempts import read_attempts

    paths = RunPaths(Path(status.run_dir))
    limits = read_limits(paths.config)
    status.max_steps = limits.max_steps
    metrics = read_metrics(paths, limits)
    if metrics:
        last = max(reversed(metrics), key=lambda r: r["step"])  # a left-out reward at the last step is unknown, not an older one
        status.last_step, status.last_reward = last["step"], last.get(REWARD_KEY)
    doc = schema.read_eval_document(paths.eval_results, limits.max_steps)
    if doc is not None:
        status.strict, status.lenient = (doc["accuracy"].get(k) for k in ("strict", "lenient"))
        status.scorer = f"{schema.protocol_name(doc)}/{schema.primary_scorer(doc)}"
        status.accuracy = schema.accuracy(doc)
    if paths.attempts.exists():
        status.attempts = len(read_attempts(paths))
    events = read_jsonl(paths.job_events, require={"event": str})
    status.requeues = sum(1 for e in events if e["event"] == "requeue")
    status.gave_up = any(e["event"] == "gave_up" and str(e.get("job_id")) == status.job_id for e in events)
    if paths.eval_results.is_file():
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
        r.job_states = {j: str(known[j]["state"]) for j in r.jobs if (known.get(j) or {}).get("state")}
        r.active_jobs = [j for j in r.jobs if r.job_states.get(j) in ACTIVE_STATES]
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


def other_jobs(r: RunStatus) -> str:
    """The run's jobs besides the row's training job: watchdogs and other training jobs
    (relaunches, resubmissions, a duplicate launch), each with its state where known;
    ended ones are counted, not listed."""
    shown, ended = [], 0
    for j in r.jobs:
        if j == r.job_id:
            continue
        state = r.job_states.get(j)
        if state and state not in ACTIVE_STATES and r.job_states:
            ended += 1
            continue
        shown.append(f"{r.job_kinds.get(j, 'train')} {j}{' ' + state if state else ''}")
    return ", ".join(shown + ([f"+{ended} ended"] if ended else [])) or "-"


def duplicate_training_jobs(r: RunStatus) -> List[str]:
    """Training jobs of one run that are pending or running at the same time (only one can train)."""
    return [j for j in r.active_jobs if r.job_kinds.get(j, "train") == "train"]


def table_rows(runs: List[RunStatus]) -> List[List[str]]:
    header = ["run", "job", "state", "requeues", "step", "reward", "accuracy", "scored by", "strict", "lenient",
              "attempts", "other-jobs"]
    rows = [header]
    for r in runs:
        step = f"{'-' if r.last_step is None else r.last_step}/{'?' if r.max_steps is None else r.max_steps}"
        rows.append([r.run, r.job_id or "-", r.state, str(r.requeues), step, _fmt(r.last_reward),
                     _fmt(r.accuracy, pct=True), r.scorer or "-", _fmt(r.strict, pct=True), _fmt(r.lenient, pct=True),
                     "-" if r.attempts is None else str(r.attempts), other_jobs(r)])
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
        for r in runs:
            dup = duplicate_training_jobs(r)
            if len(dup) > 1:
                warn(f"{r.run} has {len(dup)} training jobs pending or running ({', '.join(dup)}); only one can train "
                     f"the folder: cancel the others (scancel {' '.join(d for d in dup if d != r.job_id)})")
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
