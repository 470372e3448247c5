"""A sweep as launch plans it on the login node: every combination of the command line
composed, resolved and validated (`plan_runs`; a run folder that holds a run is resumed
with its own config.yaml, finellama_rl/resume.py), its start rung chosen, its folder
distinct from the others', free (no live lock, no pending or running job in the
sweep's ledger: `check_folders_free`), for a launch-time sweep name created
exclusively (`reserve_sweep`), and reserved for this launch while it submits
(`Reservations`). Used by finellama_rl.launch and the demo. No torch.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from finellama_rl.compose import expand_sweep, hydra_quote, split_argv
from finellama_rl.config import Config
from finellama_rl.errors import ConfigError, UsageError
from finellama_rl.resume import start_config
from finellama_rl.results import RunPaths, SweepPaths

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
    from finellama_rl.login.planner import choose_start_rung

    multirun, overrides = split_argv(argv)
    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UsageError("comma-separated values sweep only with -m (e.g. -m trainer=ppo,grpo)")
    sweep = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    runs = []
    for i, (ovs, name_parts) in enumerate(combos):
        typed = any(o.split("=")[0] in ("run.sweep", "run.dir") for o in ovs)
        with_sweep = ovs if any(o.startswith("run.sweep=") for o in ovs) else [*ovs, f"run.sweep={sweep}"]
        try:  # a typed run.sweep/run.dir may name a run to resume: its config.yaml is the truth
            cfg = start_config(with_sweep, name_parts, find_run=typed)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} [in run {i} ({' '.join(ovs) or 'defaults'})]") from None
        rung, why = choose_start_rung(cfg)
        runs.append(PlannedRun(i, ovs, cfg, rung, why, auto_sweep=None if typed else sweep))
    check_distinct(runs)
    return runs


def budget_warnings(runs: Sequence[PlannedRun]) -> List[str]:
    """One line per way the sweep's evaluation differs from its training (generation budget,
    shots: task/protocols.budget_mismatches), naming the first run it concerns and how many more."""
    from finellama_rl.task.protocols import budget_mismatches

    seen: Dict[Tuple[str, str], List[str]] = {}
    for r in runs:
        for key, message in budget_mismatches(r.cfg.trainer, r.cfg.eval):
            seen.setdefault((key, message), []).append(r.label)
    return [f"{key}: {message} [in {labels[0]}{f' and {len(labels) - 1} more run(s)' if len(labels) > 1 else ''}]"
            for (key, message), labels in seen.items()]


def check_distinct(runs: List[PlannedRun]) -> None:
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


class Reservations:
    """One launch at a time per run folder. Before the last check and the submission, each
    run folder is made ours (created with its marker, or refused: ownership.claim) and its
    launch.lock is created exclusively, so of two launches started together the second
    stops with exit 2 before it submits anything; then `check_folders_free` runs again under
    the reservation. Released when the launch has recorded its jobs in the ledger (or ran
    them locally), or failed; on a failure here, the folders made here are removed.

        with Reservations(runs, created) as held: submit_slurm(runs, held.created)
    """

    def __init__(self, runs: List[PlannedRun], created: Sequence[Path] = ()):
        self.runs, self.created, self.locks = runs, list(created), []

    def __enter__(self) -> "Reservations":
        try:
            for r in self.runs:
                self._reserve(r)
            check_folders_free(self.runs)
        except BaseException:
            self.release()
            import shutil

            for folder in sorted(set(self.created), key=lambda p: len(p.parts), reverse=True):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return self

    def _reserve(self, r: PlannedRun) -> None:
        from finellama_rl.ownership import claim, ownership_problem
        from finellama_rl.runlock import RunFolderBusy, RunLock

        run_dir = Path(r.cfg.run.dir)
        problem = ownership_problem(run_dir, r.cfg.run.resume)
        if problem:  # checked before anything is written into it
            raise ConfigError("run.dir", f"{problem} [in {r.label}]")
        missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        if missing:
            self.created.append(missing[-1])
        lock = RunLock(run_dir, path=RunPaths(run_dir).launch_lock)
        try:
            lock.acquire()
        except RunFolderBusy as exc:
            raise ConfigError("run.dir", f"{run_dir} is being launched by another command ({exc.why}); nothing was "
                                         f"submitted. Check it with python -m finellama_rl.status {run_dir.parent} "
                                         f"[in {r.label}]") from None
        self.locks.append(lock)
        claim(run_dir, "launch", r.cfg.run.resume)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def __exit__(self, *exc) -> None:
        self.release()


def ledger_path(cfg: Config) -> Path:
    return SweepPaths.of_run(Path(cfg.run.dir)).ledger
