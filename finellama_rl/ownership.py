"""What is ours to write into or move aside.

Run folders carry a marker written when they are made (`.finellama_run`: who, when,
which version, and every fresh start). `run.resume=false` moves aside only a folder with
that marker; a folder that holds files but no marker is refused (exit 2) and left as it
is, whatever its name. A run folder of an older finellama_rl (a config.yaml of ours, no
marker) may be resumed, and gets its marker then.

Some folders are never a results or run folder, whatever the settings say: `/`, a home
folder or one of its dotfolders, system folders (/etc, /usr, /proc, ...), shared roots
(/tmp, /home, /mnt, ...) and the package's own source (validation.validate_run_paths
checks run.results_dir, run.dir, the sweep folder and the index folder against them,
after resolving `..` and symlinks).

A fresh start records who started it (the launch id of a submitit job, or the SLURM
job id and restart count), so that a requeue of the same job, which replays the same
`run.resume=false`, resumes instead of moving its own progress aside.

    problem = protected_problem(Path(run.results_dir))   # None, or why we never write there
    folder_state(run_dir)                               # FolderState.absent|empty|ours|legacy|foreign
    claim(run_dir, "launch", resume=True)               # make it ours (under a lock); ConfigError if not ours
"""
from __future__ import annotations

import datetime as _dt
import getpass
import os
import socket
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Optional

from finellama_rl.errors import ConfigError, RunConfigUnreadable
from finellama_rl.fileio import atomic_write_json, read_json_object, read_run_config_data
from finellama_rl.results import RunPaths
from finellama_rl.slurm_env import job_ref, restart_count

LAUNCH_ID_ENV = "FINELLAMA_LAUNCH_ID"  # set by login/slurm.py's TrainJob: one id per submitted job, kept across requeues

# Never a results or run folder: these folders themselves ...
SHARED_ROOTS = ("/", "/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/mnt", "/media", "/opt", "/srv", "/var",
                "/usr/local", "/snap", "/nix")
# ... and nothing inside these.
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/proc", "/sys",
                "/dev", "/run", "/var/lib", "/var/log", "/var/cache", "/var/spool", "/var/mail", "/var/backups",
                "/var/run", "/var/lock")
SOURCE_FOLDERS = ("finellama_rl", "conf", "tests", "scripts", "slurm", "docs", "benchmarks", ".git")


class FolderState(str, Enum):
    absent = "absent"  # nothing there yet
    empty = "empty"  # an empty folder (lock files aside)
    ours = "ours"  # has the marker
    legacy = "legacy"  # no marker, but a config.yaml of ours: a run folder of an older finellama_rl
    foreign = "foreign"  # files that are not a run's: never written into, never moved


# ------------------------------------------------------------------ folders we never write into


HOME_PARENTS = ("/home", "/Users")  # every folder directly in these is someone's home


def _is_home(path: Path) -> bool:
    """This user's home ($HOME, the password database's), /root, or a folder directly in
    /home (never the whole password database: on a cluster it may list thousands of users)."""
    homes = {Path("/root"), Path.home(), Path(os.environ.get("HOME") or "/root")}
    resolved = set()
    for h in homes:
        try:
            resolved.add(h.resolve())
        except OSError:
            continue
    return path in resolved or str(path.parent) in HOME_PARENTS


def source_root() -> Optional[Path]:
    """The source checkout the package runs from (a folder with pyproject.toml above it), if any."""
    package = Path(__file__).resolve().parent
    return package.parent if (package.parent / "pyproject.toml").is_file() else None


def protected_problem(folder: Path) -> Optional[str]:
    """Why `folder` (after resolving `..` and symlinks) must never hold results or be a run
    folder, or None. Refused: `/` and shared roots (/tmp, /home, ...), anything inside system
    folders (/etc, /usr, /proc, ...), a home folder or a dotfolder directly in it (~/.ssh),
    the package itself and the source checkout's own folders."""
    path = Path(folder).resolve()
    text = str(path)
    for tree in SYSTEM_TREES:
        if text == tree or text.startswith(tree + "/"):
            return f"{path} lies in the system folder {tree}"
    if _is_home(path):
        return f"{path} is a home folder"
    if _is_home(path.parent) and path.name.startswith("."):
        return f"{path} is a dotfolder of the home folder {path.parent}"
    if text in SHARED_ROOTS:
        return f"{path} is a system or shared folder"
    package = Path(__file__).resolve().parent
    if path == package or package in path.parents:
        return f"{path} lies inside the finellama_rl package"
    root = source_root()
    if root is not None:
        if path == root:
            return f"{path} is the source checkout of finellama_rl"
        for name in SOURCE_FOLDERS:
            if path == root / name or (root / name) in path.parents:
                return f"{path} lies in the source folder {root / name}"
    return None


# ------------------------------------------------------------------ the marker


def _own_files(paths: RunPaths) -> set:
    return {paths.lock.name, paths.launch_lock.name}


def is_lock_file(name: str, paths: RunPaths) -> bool:
    """A lock file or the temporary names runlock.py makes next to it (`.run.lock.<hex>`),
    or the marker while another launch writes it (fileio's `..finellama_run.<rand>.tmp`: a
    launch started at the same moment must see a folder being made, not a foreign one)."""
    return (name in _own_files(paths) or any(name.startswith(f".{own}.") for own in _own_files(paths))
            or (name.startswith(f".{paths.marker.name}.") and name.endswith(".tmp")))


def read_marker(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The marker's content ({} when it is there but unreadable), None when there is none."""
    path = RunPaths(Path(run_dir)).marker
    if not path.exists():
        return None
    return read_json_object(path, "the run marker's content") or {}


def folder_state(run_dir: Path) -> FolderState:
    """Whether `run_dir` is ours (read only: nothing is written)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.exists():
        return FolderState.absent
    if not paths.root.is_dir():
        return FolderState.foreign
    if paths.marker.is_file():
        return FolderState.ours
    try:
        entries = [p for p in paths.root.iterdir() if not is_lock_file(p.name, paths)]
    except OSError:  # unreadable: certainly not a run folder of ours
        return FolderState.foreign
    if not entries:
        return FolderState.empty
    if paths.config.is_file():
        try:
            data = read_run_config_data(paths.config)
        except RunConfigUnreadable:
            return FolderState.foreign
        if isinstance(data.get("trainer"), dict) and isinstance(data.get("model"), dict) and isinstance(data.get("run"), dict):
            return FolderState.legacy
    return FolderState.foreign


def foreign_entries(run_dir: Path, limit: int = 4) -> str:
    try:
        names = sorted(p.name for p in Path(run_dir).iterdir() if not is_lock_file(p.name, RunPaths(Path(run_dir))))
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def ownership_problem(run_dir: Path, resume: bool) -> Optional[str]:
    """Why this command must not write into or move `run_dir`, or None."""
    state = folder_state(run_dir)
    if state == FolderState.foreign and not Path(run_dir).is_dir():
        return f"{run_dir} is a file, not a folder"
    if state == FolderState.foreign:
        return (f"{run_dir} holds files ({foreign_entries(run_dir)}) but is not a finellama_rl run folder (it has no "
                f"{RunPaths(Path(run_dir)).marker.name} marker); nothing was written or moved. Choose another run.dir "
                "(or run.name/run.sweep), or move those files away yourself")
    if state == FolderState.legacy and not resume:
        return (f"{run_dir} is a run folder of an older finellama_rl (no {RunPaths(Path(run_dir)).marker.name} marker), "
                "so run.resume=false does not move it aside; nothing was moved. Resume it (run.resume=true), choose "
                "another run.dir, or move it away yourself")
    return None


def claim(run_dir: Path, created_by: str, resume: bool) -> bool:
    """Make `run_dir` ours: create it and write the marker (an empty or absent folder, or an
    older run folder resumed). The caller holds run.lock or the launch reservation.
    ConfigError('run.dir') when it is not ours; returns True when the marker was written now."""
    problem = ownership_problem(run_dir, resume)
    if problem:
        raise ConfigError("run.dir", problem)
    paths = RunPaths(Path(run_dir))
    if paths.marker.is_file():
        return False
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.marker, {**_who(), "created_by": created_by, "fresh_starts": []})
    return True


def _who() -> Dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("finellama_rl")
    except PackageNotFoundError:
        ver = "unknown"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"kind": "finellama_rl run folder", "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "user": user, "host": socket.gethostname(), "version": ver}


# ------------------------------------------------------------------ fresh starts and their requeues


def this_start() -> Dict[str, Any]:
    """Who is starting: the launch id of a submitit job (the same across its requeues), the
    SLURM job id and its restart count."""
    return {"launch_id": os.environ.get(LAUNCH_ID_ENV) or None, "job_id": job_ref(),
            "restarts": restart_count()}


def is_replay(run_dir: Path) -> bool:
    """True when this process is a later start of the job that already started this folder
    fresh (a requeue replays the job's `run.resume=false`): it must resume instead."""
    now = this_start()
    for rec in (read_marker(run_dir) or {}).get("fresh_starts") or []:
        if not isinstance(rec, dict):
            continue
        if now["launch_id"] and rec.get("launch_id") == now["launch_id"]:
            return True
        if now["job_id"] and rec.get("job_id") == now["job_id"] and isinstance(rec.get("restarts"), int) \
                and now["restarts"] > rec["restarts"]:
            return True
    return False


def record_fresh_start(run_dir: Path, moved_to: Optional[Path]) -> None:
    """Append this start to the marker's fresh starts (the caller holds run.lock)."""
    paths = RunPaths(Path(run_dir))
    marker = read_marker(run_dir) or {**_who(), "created_by": "train"}
    starts = [s for s in marker.get("fresh_starts") or [] if isinstance(s, dict)]
    starts.append({**this_start(), "time": _dt.datetime.now().isoformat(timespec="seconds"),
                   "moved_to": str(moved_to) if moved_to else None})
    atomic_write_json(paths.marker, {**marker, "fresh_starts": starts})
