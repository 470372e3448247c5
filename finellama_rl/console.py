"""What a process prints: log format and levels for job-side entry points, one-line
warnings for the command-line tools, and durations as they appear in progress lines
and reports. No torch or transformers at import.
"""
from __future__ import annotations

import logging
import math
import sys


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """'1:02:03' (hours:minutes:seconds), '?' for an unknown duration."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
