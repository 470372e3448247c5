"""Checkpoints: `checkpoints/step_000200/` folders that are complete or absent.

A checkpoint is written into `checkpoints/.staging/...` and renamed into place in
one `os.replace`, so a crash mid-save never leaves a folder that looks complete.
Files use the Hugging Face Trainer's names (adapter_model.safetensors,
optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json) so TRL's
GRPOTrainer can resume from them; PPO adds value_head.safetensors. Our own
`finellama_state.json` (step, data position, rung) marks a committed checkpoint.

    commit_checkpoint(paths.checkpoints, staging_dir, step, state); latest_checkpoint(...)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from finellama_rl.results import atomic_write_json

STATE_FILE = "finellama_state.json"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def staging_root(root: Path) -> Path:
    return Path(root) / ".staging"


def list_checkpoints(root: Path) -> List[Path]:
    """Committed checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def commit_checkpoint(root: Path, staged: Path, step: int, state: Dict[str, Any], keep_last: int) -> Path:
    """Mark `staged` complete, rename it to step_NNNNNN, prune to `keep_last`."""
    atomic_write_json(Path(staged) / STATE_FILE, {"step": step, **state})
    final = checkpoint_dir(root, step)
    if final.exists():  # re-saving the same step (e.g. signal right after a scheduled save)
        shutil.rmtree(final)
    os.replace(staged, final)
    prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clear_staging(root: Path) -> None:
    """Leftovers of a save that crashed; never a valid checkpoint."""
    shutil.rmtree(staging_root(root), ignore_errors=True)
