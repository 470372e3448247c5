"""The results index: `<run.results_dir>/eval_results.json`, one entry per evaluated
checkpoint across every sweep (run, sweep, model, trainer, hardware, step, protocol
and primary scorer, accuracy under every scorer with its Wilson 95% interval, n,
protocol summary, date, path of the eval file). Index schema 2; eval files of
schema 1 (before protocols: finellama, strict primary) and 2 are both read, and an
index of schema 1 is rebuilt from the run folders on the next write.

Why: "which checkpoint of which run scored what, under which protocol" should be
one small JSON that other tools can read, without walking run folders. Many jobs
finish at once on a cluster, so every update happens under a file lock and
replaces the file atomically. The index is derived data: when it is missing,
half-written or of the wrong schema, it is rebuilt from the run folders' eval
files (`<sweep>/<run>/eval_results.json`, `eval_baseline.json`, `evals/*.json`),
and a damaged file is moved aside, never deleted.

    from finellama_rl.eval.results_index import add_entry, results_root
    add_entry(results_root(cfg.run), doc, path)        # after writing an eval file
    python -m finellama_rl.index results                 # rebuild and print a summary (index.py)

No torch here: the launch side and report read it.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from finellama_rl.eval import schema as eval_schema
from finellama_rl.fileio import atomic_write_json, read_json, warn
from finellama_rl.errors import IndexDamaged, IndexOutdated
from finellama_rl.results import ResultsPaths, RunPaths, index_root, iter_run_dirs

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 2  # 1: before eval protocols (strict/lenient only)
INDEX_KIND = "finellama_rl/eval_index"
LOCK_TIMEOUT_S = 300.0
REQUIRED_KEYS = ("run", "step", "accuracy", "n", "path")


def index_path(root: Path) -> Path:
    return ResultsPaths(Path(root)).index


def results_root(run) -> Path:
    """Where a run's index lives (`run` is a RunConfig): results.index_root."""
    return index_root(run)


def _relative(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def checkpoint_label(doc: Dict[str, Any], path: Path) -> str:
    if doc.get("checkpoint"):
        return str(doc["checkpoint"])
    return "base" if Path(path).name == RunPaths(Path(path).parent).baseline.name else f"step_{int(doc['step']):06d}"


def protocol_summary(doc: Dict[str, Any]) -> Dict[str, Any]:
    p = doc.get("protocol") or {}
    k = doc.get("pass_at_k") or {}
    decoding = p.get("decoding")
    return {"name": eval_schema.protocol_name(doc), "primary": eval_schema.primary_scorer(doc),
            "decoding": decoding.get("decoding", "greedy") if isinstance(decoding, dict) else (decoding or "greedy"),
            "shots": p.get("shots", 0), "max_new_tokens": (decoding or {}).get("max_new_tokens") if isinstance(decoding, dict)
            else p.get("max_new_tokens"), "num_examples": p.get("num_examples"), "system_prompt": p.get("system_prompt"),
            "chat_template_sha256": p.get("chat_template_sha256"), "samples": k.get("samples", 1),
            "sample_temperature": k.get("temperature")}


def run_of(eval_file: Path) -> Path:
    """The run folder an eval file belongs to (<run>/eval_*.json or <run>/evals/*.json)."""
    eval_file = Path(eval_file)
    return eval_file.parent.parent if eval_file.parent.name == RunPaths(eval_file.parent.parent).evals.name else eval_file.parent


def run_max_steps(run_dir: Path, quiet: bool = False) -> Optional[int]:
    """trainer.max_steps of a run, read as plain data; None when unknown (one warning)."""
    from finellama_rl.errors import RunConfigUnreadable
    from finellama_rl.fileio import read_run_config_data
    from finellama_rl.stats import MetricLimits

    try:
        return MetricLimits.of_config_data(read_run_config_data(RunPaths(run_dir).config, escape=False)).max_steps
    except RunConfigUnreadable as exc:
        if not quiet:
            warn(f"{exc}; its evaluations are indexed without a step bound")
        return None


UNREAD = object()


def entry_from_document(doc: Dict[str, Any], path: Path, root: Path, max_step: Any = UNREAD) -> Dict[str, Any]:
    """One index entry for an eval document (eval file schema 1 or 2), checked by the
    readers' rules (eval/schema.check_document, as status and report; a step beyond the
    run's max_steps included): ValueError when it cannot be indexed; values that break a
    rule are left out of the entry."""
    max_step = run_max_steps(run_of(path), quiet=True) if max_step is UNREAD else max_step
    checked, problems = eval_schema.check_document(doc, max_step)
    missing = [key for key in ("step", "total") if checked is not None and checked.get(key) is None]
    if checked is None or missing:
        why = "; ".join(problems) if checked is None else f"no {' or '.join(missing)}"
        raise ValueError(f"{path} is not an eval document that can be indexed ({why})")
    if problems:
        warn(f"{path}: {'; '.join(problems[:3])}; those values are not indexed")
    doc = checked
    acc, step, n, primary = doc["accuracy"], doc["step"], doc["total"], eval_schema.primary_scorer(doc)
    k = doc.get("pass_at_k") if isinstance(doc.get("pass_at_k"), dict) else None
    intervals = {name: eval_schema.interval(doc, name) for name in acc}
    return {
        "run": doc.get("run"), "sweep": doc.get("sweep"), "model": doc.get("model"), "trainer": doc.get("trainer"),
        "hardware": doc.get("hardware"), "data": doc.get("data"), "checkpoint": checkpoint_label(doc, path),
        "step": step, "split": eval_schema.split_name(doc),
        "schema_version": eval_schema.schema_version(doc), "primary": primary, "accuracy": acc,
        "correct": {name: eval_schema.correct_count(doc, name) for name in acc},
        "ci95": {name: list(ci) if ci else None for name, ci in intervals.items()}, "n": n,
        "protocol": protocol_summary(doc),
        "pass_at_k": {name: k[name] for name in acc if isinstance(k.get(name), dict)} if k else None,
        "date": doc.get("date"), "path": _relative(path, root),
    }


def validate_index(data: Any) -> List[Dict[str, Any]]:
    """The entries of a parsed index; IndexDamaged if the schema is wrong."""
    if not isinstance(data, dict):
        raise IndexDamaged(f"expected a JSON object, got {type(data).__name__}")
    if data.get("kind") == INDEX_KIND and isinstance(data.get("schema_version"), int) and data["schema_version"] < INDEX_SCHEMA_VERSION:
        raise IndexOutdated(f"schema_version {data['schema_version']} (current: {INDEX_SCHEMA_VERSION})")
    if data.get("schema_version") != INDEX_SCHEMA_VERSION or data.get("kind") != INDEX_KIND:
        raise IndexDamaged(f"schema_version/kind {data.get('schema_version')!r}/{data.get('kind')!r}, "
                           f"expected {INDEX_SCHEMA_VERSION}/{INDEX_KIND}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise IndexDamaged("`entries` is not a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(key not in e for key in REQUIRED_KEYS):
            raise IndexDamaged(f"entry {i} lacks one of {', '.join(REQUIRED_KEYS)}")
    return entries


def read_index(path: Path) -> List[Dict[str, Any]]:
    """Entries of an existing index file; IndexDamaged if it is unreadable or invalid
    (a folder in its place included)."""
    if Path(path).is_dir():
        raise IndexDamaged("a folder, not a file")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexDamaged(f"not valid JSON ({exc})") from None
    except OSError as exc:
        raise IndexDamaged(f"unreadable ({exc.strerror or exc})") from None
    return validate_index(data)


def scan_eval_files(root: Path) -> Iterator[Tuple[Path, List[Path]]]:
    """Every run folder of the results tree with its eval files."""
    for run_dir in [run for sweep in sorted(Path(root).iterdir()) if not sweep.name.startswith(".") for run in iter_run_dirs(sweep)]:
        paths = RunPaths(run_dir)
        files = [p for p in (paths.baseline, paths.eval_results) if p.exists()]
        yield run_dir, files + (sorted(paths.evals.glob("*.json")) if paths.evals.is_dir() else [])


def collect_entries(root: Path) -> List[Dict[str, Any]]:
    """Entries rebuilt from the eval files on disk; unreadable files are skipped with a warning."""
    entries = []
    for run_dir, files in scan_eval_files(root):
        max_step = run_max_steps(run_dir) if files else None
        for path in files:
            try:
                entries.append(entry_from_document(read_json(path), path, root, max_step))
            except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                why = "a folder, not a file" if isinstance(exc, IsADirectoryError) else str(exc).splitlines()[0]
                warn(f"index: skipping {path} ({why.removeprefix(f'{path} ')})")
    return entries


def _sorted(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return sorted(entries, key=lambda e: (str(e.get("sweep")), str(e.get("run")), e["step"], e["path"]))


def write_index(path: Path, entries: List[Dict[str, Any]]) -> None:
    doc = {"schema_version": INDEX_SCHEMA_VERSION, "kind": INDEX_KIND,
           "updated": _dt.datetime.now().isoformat(timespec="seconds"), "entries": _sorted(entries)}
    atomic_write_json(path, doc)


def move_aside(path: Path, why: str = "damaged") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.{why}-{stamp}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def load_entries(root: Path) -> List[Dict[str, Any]]:
    """Current entries (caller holds the lock): the file, or a rebuild when it is missing or damaged."""
    path = index_path(root)
    if not path.exists():
        return collect_entries(root)
    try:
        return read_index(path)
    except IndexOutdated as exc:
        aside = move_aside(path, "outdated")
        entries = collect_entries(root)
        log.info("results index %s is of an older %s; moved it to %s and rebuilt %d entries from the run folders",
                 path, exc, aside.name, len(entries))
        return entries
    except IndexDamaged as exc:
        aside = move_aside(path)
        entries = collect_entries(root)
        log.warning("results index %s is damaged (%s); moved it to %s and rebuilt %d entries from the run folders",
                    path, exc, aside.name, len(entries))
        return entries


def _lock(root: Path):
    from filelock import FileLock

    Path(root).mkdir(parents=True, exist_ok=True)
    return FileLock(str(ResultsPaths(Path(root)).index_lock), timeout=LOCK_TIMEOUT_S)


def add_entry(root: Path, doc: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Add (or replace: same eval file) the entry for `doc`, written at `path`. Returns the entry."""
    entry = entry_from_document(doc, Path(path), Path(root))
    with _lock(root):
        entries = [e for e in load_entries(Path(root)) if e["path"] != entry["path"]]
        write_index(index_path(root), entries + [entry])
    return entry


def add_eval_file(root: Path, path: Path) -> Optional[Dict[str, Any]]:
    """add_entry for an eval file on disk that never raises: an index problem
    (lock timeout, permissions) must not fail a finished run. Logs and returns None."""
    try:
        return add_entry(root, read_json(path), path)
    except Exception as exc:  # noqa: BLE001 - the eval file is safe on disk; the index can be rebuilt
        log.warning("could not add %s to the results index under %s: %s", path, root, exc)
        return None


def rebuild(root: Path) -> List[Dict[str, Any]]:
    """Rebuild the index from the run folders (under the lock) and return its entries.
    Whatever stands in the index's place and is not a file (a folder) is moved aside first."""
    with _lock(root):
        entries = collect_entries(Path(root))
        path = index_path(root)
        if path.exists() and not path.is_file():
            aside = move_aside(path)
            warn(f"{path} is a folder, not the index file; moved it to {aside.name}")
        write_index(path, entries)
    return _sorted(entries)
