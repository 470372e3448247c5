"""Run-folder layout and safe file writes.

Every file a run writes lives under its run folder (see ARCHITECTURE.md); JSON is
written to a temporary file in the same folder, fsynced, then renamed over the
target, so a crash never leaves a half-written file that looks complete.

    paths = RunPaths(Path(cfg.run.dir)); atomic_write_json(paths.eval_results, data)
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def training_stats(self) -> Path:
        return self.root / "training_stats.json"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval_results.json"

    @property
    def baseline(self) -> Path:
        return self.root / "eval_baseline.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def make(self) -> "RunPaths":
        for d in (self.root, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    """One whole line per call (a single write), flushed to disk."""
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn line from a crash: start on a fresh line
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """All complete lines; a torn last line (crash mid-write) is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def iter_run_dirs(sweep_dir: Path) -> Iterator[Path]:
    for cfg in sorted(Path(sweep_dir).glob("*/config.yaml")):
        yield cfg.parent


def check_writable(folder: Path) -> None:
    """Raise PermissionError with the folder name if we cannot create files there."""
    folder = Path(folder)
    probe_root = folder
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not os.access(probe_root, os.W_OK | os.X_OK):
        raise PermissionError(f"{probe_root} is not writable")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
