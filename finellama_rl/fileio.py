"""Safe file writes and tolerant readers for everything the project writes: run folders,
sweep ledgers, the results index, the fit memory.

Files are written to a temporary file in the same folder, fsynced, then renamed over the
target, so a crash or a full disk never leaves a half-written file that looks complete
(the previous version stays intact). Written files honour the umask like files made by
`open()` (a shared results folder with umask 002 stays group-readable; mkstemp alone
would make them 0600). A full disk or quota says so in one line (`DiskFullError`).

Readers (jsonl records, JSON documents, config.yaml) never crash on what a crash, a full
disk or a hand edit leaves behind: lines that are not UTF-8, not JSON, not an object, or
lack a required key of the right type are skipped with one warning per file.
`read_run_config_data` reads a run's config.yaml as plain data without resolving `${...}`
interpolations (a planted `${oc.env:HF_TOKEN}` stays text).

    atomic_write_json(RunPaths(run_dir).eval_results, data)
    read_jsonl(RunPaths(run_dir).metrics, require={"step": int})

Which file lives where is results.py's business (RunPaths); this module knows no names.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union
from finellama_rl.errors import DiskFullError, RunConfigUnreadable

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
# torch.save on a full disk raises RuntimeError("[enforce fail at inline_container.cc:...] . unexpected pos ...")
# or "... PytorchStreamWriter failed writing file ...": no errno; the free space of the folder decides.
TORCH_WRITE_TEXTS = ("inline_container.cc", "pytorchstreamwriter", "file write failed")
LOW_SPACE_BYTES = 64 * 2**20


def is_disk_full(exc: BaseException, folder: Optional[Path] = None) -> bool:
    """True for an out-of-space error, also when a library wrapped it: torch's writer
    errors count when `folder`'s file system has (almost) no space left."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
            return True
        text = str(e).lower() if e is not None else ""
        if any(t in text for t in DISK_FULL_TEXTS):
            return True
        if folder is not None and any(t in text for t in TORCH_WRITE_TEXTS):
            probe = Path(folder)
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            try:
                import shutil

                usage = shutil.disk_usage(probe)
                return usage.free < min(LOW_SPACE_BYTES, usage.total * 0.02)
            except OSError:
                return False
    return False


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` (fsynced,
    permissions `mode` minus the umask). On any error the temporary file is removed and
    `path` keeps its previous content; a full disk raises DiskFullError.

        with atomic_output(png) as tmp: fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode & ~current_umask())
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise DiskFullError(path, exc) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    """One whole line per call (a single write), flushed to disk."""
    line = json.dumps(record, default=str) + "\n"
    try:
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn line from a crash: start on a fresh line
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(Path(path), exc) from exc
        raise


def apply_umask(folder: Path) -> None:
    """Give every file under `folder` 0666 and every folder 0777, minus the umask, as `open()`
    and `mkdir` would: safetensors writes through its own temporary file and leaves 0600
    (adapter_model, value_head, rng_state), which a shared results folder cannot read."""
    mask = current_umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


# ------------------------------------------------------------------ readers

Types = Union[Type, Tuple[Type, ...]]


_WARNED: set = set()


def warn(message: str) -> None:
    """One line on stderr (console.warn's format; results stays free of other imports);
    a line already printed by this process is not repeated (a file read at several points
    of a run gets one line, not one per read)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def forget_warnings() -> None:
    """Warn again about what this process already warned about (tests that run several commands in one process)."""
    _WARNED.clear()


def _type_ok(value: Any, types: Types) -> bool:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return False  # JSON true is not a step number
    return isinstance(value, types)


def _type_name(types: Types) -> str:
    return "|".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def check_record(record: Any, require: Optional[Dict[str, Types]] = None) -> Optional[str]:
    """None if `record` is an object with every required key of the right type, else why not."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    for key, types in (require or {}).items():
        if key not in record:
            return f"missing key {key!r}"
        if not _type_ok(record[key], types):
            return f"{key!r} is {type(record[key]).__name__}, expected {_type_name(types)}"
    return None


Check = Callable[[Dict[str, Any]], Tuple[Optional[Dict[str, Any]], Optional[str]]]


def read_jsonl(path: Path, require: Optional[Dict[str, Types]] = None, quiet: bool = False,
               check: Optional[Check] = None) -> List[Dict[str, Any]]:
    """Every valid record of a jsonl file ([] when it is missing or unreadable).

    A torn last line (a crash mid-write) is skipped silently; any other bad line (not
    UTF-8, not JSON, not an object, a required key missing or of the wrong type) is
    skipped, with one warning per file. `check(record)` may refuse more: it returns
    (the record to keep, or None to skip it; what was wrong, or None), e.g. a step outside
    the run's range, or a value it dropped from the record (stats.metrics_check);
    its problems count in the same one warning.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        if not quiet:
            warn(f"cannot read {path} ({exc.strerror or exc}); ignoring it")
        return []
    lines = data.split(b"\n")
    torn_last = bool(lines) and lines[-1] != b""
    out, bad, fixed, first = [], 0, 0, ""
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            problem = check_record(record, require)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except ValueError:
            problem = "not JSON"
        if problem is None and check is not None:
            record, problem = check(record)
            if record is not None:
                out.append(record)
                if problem:
                    fixed += 1
                    first = first or f"line {i + 1}: {problem}"
                continue
        if problem is None:
            out.append(record)
        elif not (torn_last and i == len(lines) - 1 and problem == "not JSON"):
            bad += 1
            first = first or f"line {i + 1}: {problem}"
    if (bad or fixed) and not quiet:
        what = [f"skipped {bad} malformed line(s)"] if bad else []
        what += [f"left out bad values on {fixed} line(s)"] if fixed else []
        warn(f"{path}: {' and '.join(what)} (first: {first})")
    return out



def read_json(path: Path) -> Any:
    """Parse a JSON file; ValueError (not a UnicodeDecodeError traceback) when it is not UTF-8 JSON."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_json_object(path: Path, what: str = "", require: Optional[Dict[str, Types]] = None,
                     quiet: bool = False) -> Optional[Dict[str, Any]]:
    """A JSON object from a run-folder file, or None (with a one-line warning) when it is
    missing, unreadable, not an object, or lacks a required key of the right type."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if not path.is_file():
            raise ValueError("a folder, not a file" if path.is_dir() else "not a regular file")
        doc = read_json(path)
        problem = check_record(doc, require)
    except (OSError, ValueError) as exc:
        problem = str(exc).splitlines()[0].removeprefix(f"{path} ") if str(exc) else type(exc).__name__
    if problem is None:
        return doc
    if not quiet:
        warn(f"{path}: {problem}; ignoring {what or 'it'}")
    return None


def is_whole(value: Any) -> bool:
    """An integer, not a bool (JSON true is not a step number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite number (int or float), not a bool, NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fraction_or_none(value: Any, where: str) -> Optional[float]:
    """A value that must lie in [0, 1] (an accuracy): the float, or None with a warning
    when it is missing, not a number or out of range (7.5 is refused, never shown as 750%)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        warn(f"{where}: {value!r} is not a number; not shown")
        return None
    if not 0.0 <= float(value) <= 1.0:
        warn(f"{where}: {value!r} is outside [0, 1]; not shown")
        return None
    return float(value)


def number_or_none(value: Any, where: str = "") -> Optional[float]:
    """A finite float, or None (with a warning when `where` is given) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        if value is not None and where:
            warn(f"{where}: {value!r} is not a number; not shown")
        return None
    return float(value)


def _escape_interpolations(node: Any) -> Any:
    """Plain YAML data with every `${` escaped, so OmegaConf never resolves it."""
    if isinstance(node, dict):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(v) for v in node]
    if isinstance(node, str) and "${" in node:
        return node.replace("${", "\\${")
    return node


def read_run_config_data(path: Path, escape: bool = True) -> Dict[str, Any]:
    """A run folder's config.yaml as plain data, never resolving `${...}` (no
    `oc.env`, no custom resolvers) and never constructing Python objects (YAML safe
    loader). With `escape`, `${` in strings is escaped so that the data can be merged
    into an OmegaConf config and stays literal text. RunConfigUnreadable otherwise."""
    import yaml

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise RunConfigUnreadable(f"{path} not found") from None
    except UnicodeDecodeError as exc:
        raise RunConfigUnreadable(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise RunConfigUnreadable(f"{path} is a folder, not a file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise RunConfigUnreadable(f"{path} is not readable YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunConfigUnreadable(f"{path} is not a YAML mapping ({type(data).__name__})")
    return _escape_interpolations(data) if escape else data


def config_value(data: Dict[str, Any], dotted: str) -> Any:
    """data['a']['b'] for 'a.b', or None when any part is missing or not a mapping."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
