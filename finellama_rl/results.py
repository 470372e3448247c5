"""The run folder, the sweep folder and the results folder: every path they hold is
named here and nowhere else (a test greps the package for the names), and what makes
a folder a run folder. Writing and reading those files safely is fileio.py's part.

    paths = RunPaths(Path(cfg.run.dir)); atomic_write_json(paths.eval_results, data)

Layout (docs/ARCHITECTURE.md draws it): see RunPaths, SweepPaths and ResultsPaths.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of one run folder (results/<sweep>/<run>/).

    Inside a checkpoint folder (checkpoints/step_000200/) the layout is checkpoint.py's
    (manifest, adapter, optimizer, RNG) and the trainers' (the HF Trainer's files)."""

    root: Path

    # --- what training writes
    @property
    def config(self) -> Path:  # the resolved config the run uses (the truth on resume)
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:  # one line per logged step
        return self.root / "metrics.jsonl"

    @property
    def metrics_discarded(self) -> Path:  # lines of steps lost since the checkpoint a run resumed from
        return self.root / "metrics_discarded.jsonl"

    @property
    def training_stats(self) -> Path:
        return self.root / "training_stats.json"

    @property
    def eval_results(self) -> Path:  # the final evaluation
        return self.root / "eval_results.json"

    @property
    def baseline(self) -> Path:  # the evaluation before training (step 0)
        return self.root / "eval_baseline.json"

    @property
    def evals(self) -> Path:  # evaluations during training (step_N.json) and by the evaluate command
        return self.root / "evals"

    def eval_at_step(self, step: int) -> Path:
        return self.evals / f"step_{step:06d}.json"

    @property
    def best_checkpoint(self) -> Path:  # SFT keep_best: the best checkpoint and every evaluation
        return self.root / "best_checkpoint.json"

    @property
    def attempts(self) -> Path:  # one line per attempt of the OOM ladder
        return self.root / "attempts.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock(self) -> Path:  # held while a process trains the folder (runlock.py)
        return self.root / "run.lock"

    @property
    def marker(self) -> Path:  # written when the folder is made: who, when, which version (ownership.py)
        return self.root / ".finellama_run"

    @property
    def launch_lock(self) -> Path:  # held by one launch while it checks and submits this run (login/sweep.py)
        return self.root / "launch.lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    # --- trainer=rm
    @property
    def rm_data(self) -> Path:  # the labelled data, reused by a restarted run
        return self.root / "rm_data.jsonl"

    @property
    def rm_eval(self) -> Path:
        return self.root / "rm_eval.json"

    @property
    def reward_model(self) -> Path:  # the trained reward model (reward_model.path=<run folder> loads it)
        return self.root / "reward_model"

    # --- logs/: what the job writes (and older sweeps' watchdogs)
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def submitit_logs(self) -> Path:  # the training job's submitit folder: <job>_0_log.out, pickles
        return self.logs / "submitit"

    @property
    def watch_logs(self) -> Path:  # older sweeps: the watchdog jobs' submitit folder
        return self.logs / "watch"

    def job_log(self, job_id: str, watchdog: bool = False) -> Path:
        return (self.watch_logs if watchdog else self.submitit_logs) / f"{job_id}_0_log.out"

    @property
    def job_events(self) -> Path:  # start, signal, requeue, OOM restart, run exit
        return self.logs / "job_events.jsonl"

    @property
    def current_attempt(self) -> Path:  # the attempt in progress (a hard kill leaves it behind)
        return self.logs / "current_attempt.json"

    def rank_exit_of(self, round_no: int) -> Path:  # data parallel: the exit code the ranks meant, per start of them
        return self.logs / f"rank_exit.{round_no}.json"

    def rank_exit_files(self):  # every round's (the first node clears them when a job starts)
        return sorted(self.logs.glob("rank_exit.*.json"))

    @property
    def stop_request(self) -> Path:  # data parallel: the supervisor asks the ranks to save and stop
        return self.logs / "stop_request"

    def oom_claim(self, attempt: int) -> Path:  # data parallel: the one rank that records an attempt's OOM
        return self.logs / f"oom_claim-{attempt}"

    # folders that belong to the run itself (never taken for runs nested in it)
    OWN_FOLDERS = ("checkpoints", "logs", "evals", "tensorboard", "wandb", "reward_model")
    FILE_NAMES = ("config", "metrics", "metrics_discarded", "training_stats", "eval_results", "baseline", "best_checkpoint",
                  "attempts", "lock", "rm_data", "rm_eval", "job_events", "current_attempt", "stop_request", "marker")
    FOLDER_NAMES = ("evals", "checkpoints", "tensorboard", "wandb", "reward_model", "logs", "submitit_logs", "watch_logs")

    def wrong_kinds(self, names: Optional[tuple] = None) -> list:
        """One line per path of the run (of `names`: FILE_NAMES and FOLDER_NAMES by default)
        that exists as the wrong kind: a folder where a file belongs (metrics.jsonl/) or a
        file where a folder belongs (evals). A run cannot write there; readers skip them."""
        files = [n for n in self.FILE_NAMES if names is None or n in names]
        folders = [n for n in self.FOLDER_NAMES if names is None or n in names]
        out = [f"{p} is a folder, not a file" for p in (getattr(self, n) for n in files) if p.exists() and not p.is_file()]
        return out + [f"{p} is a file, not a folder" for p in (getattr(self, n) for n in folders) if p.exists() and not p.is_dir()]

    def make(self) -> "RunPaths":
        for d in (self.root, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class SweepPaths:
    """A sweep folder (results/<sweep>/): its runs, and the ledger of every job launch submitted."""

    root: Path

    @property
    def ledger(self) -> Path:  # one line per run and job (older sweeps: also watchdogs and resubmissions)
        return self.root / "ledger.jsonl"

    @property
    def demo_args(self) -> Path:  # a demo sweep: the demo's command line, for `python -m finellama_rl.demo --resume`
        return self.root / "demo.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def submitit_logs(self) -> Path:  # arrays and packs: <array>_<task>_0_log.out, pickles, <array>_submission.sh
        return self.logs / "submitit"

    @classmethod
    def of_run(cls, run_dir: Path) -> "SweepPaths":
        return cls(Path(run_dir).parent)


@dataclass(frozen=True)
class ResultsPaths:
    """The results folder (run.results_dir): the index of every evaluation in it."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / "eval_results.json"

    @property
    def index_lock(self) -> Path:
        return self.root / "eval_results.json.lock"


def run_markers(folder: Path):
    """The files whose presence makes a folder a run folder."""
    paths = RunPaths(Path(folder))
    return (paths.marker, paths.config, paths.lock, paths.checkpoints, paths.metrics)


def is_run_folder(folder: Path) -> bool:
    return any(m.exists() for m in run_markers(folder))


def run_dir_problem(run_dir: Path, results_root: Path) -> Optional[str]:
    """Why `run_dir` must not be a run folder, or None: it is a file, lies inside another
    run's folder, or holds runs or a sweep ledger itself (run.resume=false would move
    them all aside)."""
    run_dir, results_root = Path(run_dir), Path(results_root)
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir} is a file, not a folder"
    for parent in run_dir.parents:
        if parent == results_root or parent == parent.parent:
            break
        if is_run_folder(parent):
            return f"{run_dir} lies inside the run folder {parent}; choose a folder outside it"
    if run_dir.is_dir():
        if SweepPaths(run_dir).ledger.exists() or any(is_run_folder(p) for p in run_dir.iterdir() if p.is_dir()
                                                      and p.name not in ("checkpoints", "logs", "evals")):
            return f"{run_dir} holds other runs (a sweep or results folder); choose a folder of its own"
    return None


def index_root(run) -> Path:
    """Where a run's results index lives (`run` is a RunConfig): run.results_dir.

    A relative results_dir is taken relative to the results tree the run folder
    sits in (`<results_dir>/<sweep>/<name>`), so the index is found from any
    working directory and after the tree is moved; a hand-picked run.dir keeps
    its index in its parent folder.
    """
    run_dir = Path(run.dir).resolve() if run.dir else None
    if Path(run.results_dir).is_absolute() or run_dir is None:
        return Path(run.results_dir).resolve()
    if run_dir.name == run.name and run_dir.parent.name == run.sweep:
        return run_dir.parent.parent
    return run_dir.parent  # a hand-picked run.dir (e.g. results/mine): the index sits beside it


def iter_run_dirs(sweep_dir: Path) -> Iterator[Path]:
    """The run folders of a sweep folder (those with a config.yaml), by name; hidden folders are skipped."""
    for child in sorted(Path(sweep_dir).iterdir()) if Path(sweep_dir).is_dir() else ():
        if not child.name.startswith(".") and RunPaths(child).config.exists():
            yield child


def check_writable(folder: Path) -> None:
    """Raise PermissionError naming the folder if we cannot create files there (a file
    on the way, /proc, a read-only or full file system). Probes the nearest existing
    ancestor with a temporary file that is removed at once; creates nothing else."""
    folder = Path(folder)
    probe_root = folder
    while not probe_root.exists() and probe_root != probe_root.parent:
        probe_root = probe_root.parent
    if not probe_root.is_dir():
        raise PermissionError(f"{probe_root} is a file, not a folder")
    if not os.access(probe_root, os.W_OK | os.X_OK):
        raise PermissionError(f"{probe_root} is not writable")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".finellama-probe-", dir=probe_root)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PermissionError(f"cannot create files in {probe_root} ({exc.strerror or exc})") from None
