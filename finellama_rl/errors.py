"""The project's user-facing errors and the process exit codes, in one place.

Every error a user can cause or must act on derives from `FinellamaError` and carries
the exit code an entry point ends with (`compose.cli_main` prints it as one line,
`error: <message>`, never a traceback). Exit codes are part of the interface: SLURM
jobs, the job's controller, sbatch scripts and the OOM ladder's supervisor read them.

    raise ConfigError("trainer.micro_batch", "must divide 64; try 8")   # exit 2
    sys.exit(exit_code(exc))

No imports from the rest of the package: everything may import this module.
"""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

EXIT_OK = 0
EXIT_USAGE = 2  # bad input (a setting, a command line, a busy run folder): nothing was started
EXIT_CRASH_TEST = 3  # debug.crash_after_step stopped the run on purpose
EXIT_LADDER_EXHAUSTED = 4  # out of memory on every rung of the OOM ladder
EXIT_DISK_FULL = 74  # EX_IOERR: a write failed for lack of space; run again after freeing some
EXIT_STOPPED = 75  # EX_TEMPFAIL: saved and stopped on a signal; run again (or requeue) to continue
EXIT_OOM_RETRY = 76  # a torchrun rank ran out of memory and recorded it: the supervisor restarts the ranks one rung down


class FinellamaError(Exception):
    """Base of the project's user-facing errors; `exit_code` is what the process exits with."""

    exit_code = EXIT_USAGE


class ConfigError(FinellamaError, ValueError):
    """A bad user setting: `key` names it, the message says what to set instead."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class UsageError(FinellamaError, ValueError):
    """Bad command-line usage (an unknown flag, a sweep where one run is expected)."""


class RunConfigUnreadable(FinellamaError, ValueError):
    """A run folder's config.yaml cannot be read as a YAML mapping."""


class IndexDamaged(FinellamaError, ValueError):
    """The results index file cannot be used as it is (it is moved aside and rebuilt)."""


class IndexOutdated(IndexDamaged):
    """The results index has an older schema (rebuilt without a warning)."""


class SubmissionFailed(FinellamaError, RuntimeError):
    """sbatch refused a job: the message is its error line."""


class DiskFullError(FinellamaError, OSError):
    """A write failed because the disk (or the quota) is full; the previous file is intact."""

    exit_code = EXIT_DISK_FULL

    def __init__(self, path: Path, cause: Optional[BaseException] = None):
        reason = f" ({cause})" if cause else ""
        OSError.__init__(self, errno.ENOSPC, f"disk full (or quota exceeded) while writing {path}{reason}; "
                                             "the previous version of the file is intact; free space and run again")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def exit_code(exc: BaseException) -> int:
    """The exit code for an exception that reached an entry point (1 for anything unexpected)."""
    return exc.exit_code if isinstance(exc, FinellamaError) else 1
