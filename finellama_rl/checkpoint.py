"""Checkpoints: `checkpoints/step_000200/` folders that are complete and durable, or
absent.

A checkpoint is written into `checkpoints/.staging/...`; `commit_checkpoint` records
a manifest (size and SHA-256 of every file) in `finellama_state.json`, fsyncs every
file and the folder, renames it into place in one `os.replace`, fsyncs the parent,
and only then prunes older checkpoints (each moved into `.trash/` first, so a prune
cut short never leaves a half-deleted folder that looks complete). So a crash or a
node failure at any point leaves at least one complete checkpoint, also with
keep_last=1 and a re-save of the same step. `latest_checkpoint` verifies the
manifest and falls back to the previous checkpoint when the newest is damaged
(truncated or changed files).

Files use the Hugging Face Trainer's names (adapter_model.safetensors, optimizer.pt,
scheduler.pt, rng_state.pth, trainer_state.json) so TRL's GRPOTrainer can resume
from them; PPO writes its own safe formats (finellama_rl/job/snapshot.py).

`checkpoints/.snapshot/step_N` holds the host-memory snapshot a run wrote after an
in-process out-of-memory (finellama_rl/job/snapshot.py); it is resumed like a
checkpoint when it is newer, and dropped once a committed checkpoint reaches its step.

    commit_checkpoint(paths.checkpoints, staging_dir, step, state); latest_checkpoint(...)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from finellama_rl.fileio import apply_umask, atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "finellama_state.json"
SNAPSHOT_DIR = ".snapshot"
TRASH_DIR = ".trash"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
KILL_AT_ENV = "FINELLAMA_TEST_KILL_AT_EVENT"  # test hook: SIGKILL at the N-th checkpoint event
_events = 0


def fault_point(label: str) -> None:
    """A point of the save protocol where a crash may happen. With the test hook
    FINELLAMA_TEST_KILL_AT_EVENT=N the process SIGKILLs itself at the N-th one
    (tests/test_checkpoint.py kills a save at every point); otherwise nothing."""
    global _events
    kill_at = os.environ.get(KILL_AT_ENV)
    if not kill_at:
        return
    _events += 1
    if _events == int(kill_at):
        print(f"[test hook] SIGKILL at checkpoint event {_events}: {label}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def staging_root(root: Path) -> Path:
    return Path(root) / ".staging"


def snapshot_root(root: Path) -> Path:
    return Path(root) / SNAPSHOT_DIR


def list_checkpoints(root: Path) -> List[Path]:
    """Committed checkpoints (verified or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def step_of(ckpt: Path) -> int:
    return int(_STEP_RE.match(Path(ckpt).name).group(1))


# ----------------------------------------------------------------- durability


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path) -> Dict[str, Dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file but the state file."""
    folder = Path(folder)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        out[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (the folder's entries: names created or renamed in it)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder bottom-up, on disk."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def _state_problem(ckpt: Path, state: Any) -> Optional[str]:
    """What is wrong with a parsed state file (types a resume relies on), or None."""
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    step, m = state.get("step"), _STEP_RE.match(Path(ckpt).name)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (m and step != int(m.group(1))):
        return f"{STATE_FILE}: step {step!r} is not the folder's step"
    files = state.get("manifest")
    if files is not None and (not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            and not Path(k).is_absolute() and ".." not in Path(k).parts for k, v in files.items())):
        return f"{STATE_FILE}: the manifest is not a list of relative files with bytes and sha256"
    if not isinstance(state.get("pending_metrics", []), list) or not isinstance(state.get("pending_tokens", 0.0), (int, float)):
        return f"{STATE_FILE}: pending_metrics/pending_tokens have the wrong type"
    return None


def safetensors_problem(path: Path) -> Optional[str]:
    """What makes `path` no readable safetensors file (a short or damaged header, a size
    that is not the header's), or None. Reads the header only; no torch."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if length < 2 or 8 + length > size:
            return f"{path.name} is not a complete safetensors file ({size} bytes, header of {max(length, 0)} bytes)"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has a damaged safetensors header"
    if 8 + length + max(ends, default=0) != size:
        return f"{path.name} holds {size - 8 - length} bytes of tensors, its header says {max(ends, default=0)} (truncated?)"
    return None


def adapter_problem(folder: Path) -> Optional[str]:
    """What makes a LoRA adapter folder (a checkpoint, its frozen `sft/` adapter) unloadable:
    adapter_config.json not a UTF-8 JSON object, adapter_model.safetensors damaged; or None.
    evaluate, resume and model.adapter all ask this before a model loads."""
    for sub in (Path(folder), Path(folder) / "sft"):
        config, weights = sub / "adapter_config.json", sub / "adapter_model.safetensors"
        for path in (config, weights):
            if path.exists() and not path.is_file():
                return f"{path.relative_to(folder)} is a folder, not a file"
        if config.exists():
            try:
                if not isinstance(json.loads(config.read_bytes().decode("utf-8")), dict):
                    return f"{config.relative_to(folder)} is not a JSON object"
            except UnicodeDecodeError:
                return f"{config.relative_to(folder)} is not UTF-8"
            except ValueError:
                return f"{config.relative_to(folder)} is not JSON"
        problem = safetensors_problem(weights) if weights.exists() else None
        if problem:
            return str(Path(sub.relative_to(folder)) / problem) if sub != Path(folder) else problem
    return None


def verify_checkpoint(ckpt: Path, hashes: bool = True) -> Optional[str]:
    """None if `ckpt` is complete, else what is wrong (checked against its manifest, then
    the adapter files' structure: the same words in evaluate and on resume)."""
    ckpt = Path(ckpt)
    if (ckpt / STATE_FILE).is_dir():
        return f"{STATE_FILE} is a folder, not a file"
    try:
        state = json.loads((ckpt / STATE_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {STATE_FILE}: {type(exc).__name__ if isinstance(exc, UnicodeDecodeError) else exc}"
    problem = _state_problem(ckpt, state)
    if problem:
        return problem
    for rel, want in (state.get("manifest") or {}).items():  # None: written before manifests existed
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is {'a folder, not a file' if path.is_dir() else 'missing'}"
        if path.stat().st_size != want["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if hashes and _sha256(path) != want["sha256"]:
            return f"{rel} differs from the manifest (SHA-256)"
    try:
        return adapter_problem(ckpt)
    except OSError as exc:
        return f"unreadable adapter files ({exc.strerror or exc})"


def latest_checkpoint(root: Path, quiet: bool = False) -> Optional[Path]:
    """The newest complete checkpoint; a damaged newer one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if not quiet:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", ckpt, problem)
    return None


def latest_resume_point(root: Path, quiet: bool = False) -> Optional[Path]:
    """The newest complete checkpoint or in-process OOM snapshot, whichever is later."""
    candidates = [c for c in (latest_checkpoint(root, quiet), latest_checkpoint(snapshot_root(root), quiet)) if c is not None]
    return max(candidates, key=step_of) if candidates else None


def unusable_checkpoints(root: Path) -> Optional[str]:
    """When `root` holds committed checkpoints (or OOM snapshots) and not one of them
    verifies: what is wrong with the newest few; None when one is usable or there are none."""
    found = list_checkpoints(root) + list_checkpoints(snapshot_root(root))
    problems = []
    for ckpt in sorted(found, key=step_of, reverse=True):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return None
        problems.append(f"{ckpt.name}: {problem}")
    return "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "") if problems else None


def read_state(ckpt: Path) -> Dict[str, Any]:
    """The state file of a checkpoint that verify_checkpoint accepted."""
    return json.loads((Path(ckpt) / STATE_FILE).read_bytes().decode("utf-8"))


# --------------------------------------------------------------------- commit


def _discard(root: Path, folder: Path) -> None:
    """Rename into .trash (atomic: the folder stops being a checkpoint at once), then delete."""
    trash = Path(root) / TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / f"{folder.name}-{os.getpid()}-{time.time_ns()}"
    os.replace(folder, target)
    fault_point(f"moved {folder.name} to the trash")
    fsync_path(root)
    shutil.rmtree(target, ignore_errors=True)
    fault_point(f"deleted {folder.name}")


def commit_checkpoint(root: Path, staged: Path, step: int, state: Dict[str, Any], keep_last: int,
                      keep: Sequence[int] = ()) -> Path:
    """Mark `staged` complete (manifest), make it durable, rename it to step_NNNNNN, and
    only then prune to `keep_last` complete checkpoints (plus the steps in `keep`: SFT's best)."""
    root, staged = Path(root), Path(staged)
    root.mkdir(parents=True, exist_ok=True)
    apply_umask(staged)  # the libraries' writers leave some files 0600
    atomic_write_json(staged / STATE_FILE, {"step": step, **state, "manifest": manifest(staged)})
    fault_point("state file written")
    fsync_tree(staged)
    fault_point("staged folder fsynced")
    final = checkpoint_dir(root, step)
    if final.exists() and verify_checkpoint(final) is None:
        # Re-saving a step (a signal right after a scheduled save): the same state is
        # already complete on disk. Keep it rather than ever having no checkpoint.
        shutil.rmtree(staged)
        fault_point("re-save of a complete step dropped")
    else:
        if final.exists():
            _discard(root, final)  # damaged: never the only complete one (it is not complete)
        os.replace(staged, final)
        fault_point("renamed into place")
        fsync_path(root)
        fault_point("parent fsynced")
    prune_checkpoints(root, keep_last, keep)
    drop_snapshots(root, step)
    return final


def prune_checkpoints(root: Path, keep_last: int, keep: Sequence[int] = ()) -> None:
    """Discard all but the newest `keep_last` complete checkpoints (and the steps in `keep`);
    keep_last 0 keeps every one (trainer.keep_last=0)."""
    complete = list_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if step_of(old) not in keep:
            _discard(root, old)
    shutil.rmtree(Path(root) / TRASH_DIR, ignore_errors=True)


def drop_snapshots(root: Path, up_to_step: int) -> None:
    """OOM snapshots that a committed checkpoint has caught up with."""
    for snap in list_checkpoints(snapshot_root(root)):
        if step_of(snap) <= up_to_step:
            _discard(snapshot_root(root), snap)


def clear_staging(root: Path) -> None:
    """Leftovers of a save that crashed; never a valid checkpoint."""
    shutil.rmtree(staging_root(root), ignore_errors=True)
    shutil.rmtree(Path(root) / TRASH_DIR, ignore_errors=True)
