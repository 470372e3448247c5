"""All-or-nothing submission of a sweep to SLURM (used by finellama_rl.launch).

Every run was already accepted by `sbatch --test-only`; if sbatch still refuses a
job (the queue limit was reached, the controller restarted, a Ctrl-C), this module
cancels every job this command submitted (training jobs and watchdogs), restores
the ledgers, and removes the files and folders this command created, then reports
the run and the setting. Nothing half-submitted stays behind.

    with Submission(runs, ledger_path, created_folders) as sub:
        rows = [sub.submit(r) for r in runs]
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

from finellama_rl.config import Config
from finellama_rl.errors import ConfigError
from finellama_rl.fileio import atomic_write_bytes
from finellama_rl.errors import SubmissionFailed
from finellama_rl.results import RunPaths


class Submission:
    def __init__(self, runs: Sequence, ledger_path: Callable[[Config], Path], created: Sequence[Path] = ()):
        self.runs = list(runs)
        self.ledger_path = ledger_path
        self.created: List[Path] = list(created)  # folders this command made (removed on failure)
        self.ledgers: Dict[Path, Optional[bytes]] = {}
        self.files_before: Dict[Path, Set[str]] = {}
        self.job_ids: List[str] = []

    def __enter__(self) -> "Submission":
        for r in self.runs:
            path = self.ledger_path(r.cfg)
            if path not in self.ledgers:
                self.ledgers[path] = path.read_bytes() if path.exists() else None
        return self

    def _make_dirs(self, run_dir: Path) -> None:
        for folder in (RunPaths(run_dir).submitit_logs, RunPaths(run_dir).watch_logs):
            missing = [p for p in [folder, *folder.parents] if not p.exists()]
            if missing:
                folder.mkdir(parents=True, exist_ok=True)
                self.created.append(missing[-1])
            self.files_before.setdefault(folder, {p.name for p in folder.iterdir()})

    def submit(self, r) -> List[str]:
        """Submit one run (and its watchdog), record both in the ledger; a table row."""
        from finellama_rl.login import slurm

        cfg, argv = r.cfg, r.train_argv()
        self._make_dirs(Path(cfg.run.dir))
        try:
            job = slurm.submit(cfg, argv)
            self.job_ids.append(str(job.job_id))
            slurm.record_submission(self.ledger_path(cfg), cfg, job.job_id, argv)
            if cfg.ladder.enabled and cfg.ladder.max_resubmits:
                dog = slurm.submit_watchdog(cfg, job.job_id, argv, 0)
                self.job_ids.append(str(dog.job_id))
                slurm.record_submission(self.ledger_path(cfg), cfg, dog.job_id, argv, kind="watchdog", watches=job.job_id)
        except SubmissionFailed as exc:
            raise ConfigError(slurm.sbatch_error_key(str(exc)), f"sbatch refused {r.label}: {exc}") from None
        log = RunPaths(Path(cfg.run.dir)).job_log(job.job_id)
        return [cfg.run.name, str(job.job_id), cfg.hardware.name, cfg.hardware.slurm.partition or "(default)",
                f"{r.start_rung} ({r.rung_reason})", str(log)]

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        cancelled = len(self.job_ids)
        self.rollback()
        if isinstance(exc, ConfigError):
            raise ConfigError(exc.key, f"{exc.message}; cancelled the {cancelled} job(s) this command had submitted "
                                       "and removed what it wrote: nothing was submitted") from None
        return False

    def rollback(self) -> None:
        from finellama_rl.login import slurm

        slurm.cancel(self.job_ids)
        for path, before in self.ledgers.items():
            if before is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, before)
        for folder, names in self.files_before.items():
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name not in names:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        for folder in sorted(set(self.created), key=lambda p: len(p.parts), reverse=True):
            shutil.rmtree(folder, ignore_errors=True)
