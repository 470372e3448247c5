"""All-or-nothing submission of a sweep to SLURM (used by finellama_rl.launch).

The sweep arrives as chunks of job units (login/units.py): a chunk of several units is
one job array (one sbatch call), a chunk of one a plain job. Every chunk was already
accepted by `sbatch --test-only`; if sbatch still refuses one (the queue limit was
reached, the controller restarted, a Ctrl-C), this module cancels every job and array
this command submitted, restores the ledgers, and removes the files and folders this
command created, then reports the run and the setting. Nothing half-submitted stays
behind.

    with Submission(runs, ledger_path, created_folders) as sub:
        rows = [row for i, chunk in enumerate(chunks) for row in sub.submit_chunk(chunk, i)]

Each run gets one ledger line (its job id: `<array>_<task>` for an array task) and its
log at `<run>/logs/submitit/<job>_0_log.out`: submitit's own file for a plain job, a link
to the array's log in `<sweep>/logs/submitit/` for an array task, the run's own step log
for a packed run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

from finellama_rl.config import Config
from finellama_rl.errors import ConfigError, SubmissionFailed
from finellama_rl.fileio import atomic_write_bytes
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import array_of


class Submission:
    def __init__(self, runs: Sequence, ledger_path: Callable[[Config], Path], created: Sequence[Path] = ()):
        self.runs = list(runs)
        self.ledger_path = ledger_path
        self.created: List[Path] = list(created)  # folders this command made (removed on failure)
        self.ledgers: Dict[Path, Optional[bytes]] = {}
        self.files_before: Dict[Path, Set[str]] = {}
        self.job_ids: List[str] = []  # jobs and whole arrays this command submitted

    def __enter__(self) -> "Submission":
        for r in self.runs:
            path = self.ledger_path(r.cfg)
            if path not in self.ledgers:
                self.ledgers[path] = path.read_bytes() if path.exists() else None
        return self

    def _make_dir(self, folder: Path) -> None:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            self.created.append(missing[-1])
        self.files_before.setdefault(folder, {p.name for p in folder.iterdir()})

    def submit_chunk(self, chunk: List, index: int) -> List[List[str]]:
        """Submit one chunk (a job, or an array of several units), record every run in the
        ledger; the table's rows."""
        from finellama_rl.login import slurm
        from finellama_rl.login.units import chunk_name

        folder = chunk[0].folder(alone=len(chunk) == 1)
        self._make_dir(folder)
        for unit in chunk:
            for r in unit.runs:
                self._make_dir(RunPaths(Path(r.cfg.run.dir)).submitit_logs)
        try:
            ids = slurm.submit_units(chunk, folder, chunk_name(chunk, index))
        except SubmissionFailed as exc:
            what = chunk[0].label if len(chunk) == 1 else f"the array of {chunk[0].label} .. {chunk[-1].label}"
            raise ConfigError(slurm.sbatch_error_key(str(exc)), f"sbatch refused {what}: {exc}") from None
        self.job_ids.append(array_of(ids[0]) or ids[0])
        self.job_ids.extend(i for i in ids[1:] if not array_of(i))
        return [row for unit, job_id in zip(chunk, ids) for row in self._record(unit, job_id, folder)]

    def _record(self, unit, job_id: str, folder: Path) -> List[List[str]]:
        from finellama_rl.login import slurm

        extra = {}
        if array_of(job_id):
            extra.update(array=array_of(job_id), task=int(job_id.rsplit("_", 1)[1]))
        if unit.packed:
            extra["pack"] = [r.cfg.run.name for r in unit.runs]
        rows = []
        for r in unit.runs:
            cfg, argv = r.cfg, r.train_argv()
            log = RunPaths(Path(cfg.run.dir)).job_log(job_id)
            if array_of(job_id) and not unit.packed:  # the array's log, where status and the table point
                log.unlink(missing_ok=True)
                log.symlink_to(os.path.relpath(folder / log.name, log.parent))
            slurm.record_submission(self.ledger_path(cfg), cfg, job_id, argv, **extra)
            rows.append([cfg.run.name, job_id, cfg.hardware.name, cfg.hardware.slurm.partition or "(default)",
                         f"{r.start_rung} ({r.rung_reason})", str(log)])
        return rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        cancelled = len(self.job_ids)
        self.rollback()
        if isinstance(exc, ConfigError):
            raise ConfigError(exc.key, f"{exc.message}; cancelled the {cancelled} job(s) and array(s) this command "
                                       "had submitted and removed what it wrote: nothing was submitted") from None
        return False

    def rollback(self) -> None:
        from finellama_rl.login import scheduler

        scheduler.cancel(self.job_ids)
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
