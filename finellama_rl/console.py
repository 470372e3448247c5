"""What a process prints: log format and levels for job-side entry points, and
one-line warnings for the command-line tools. No torch or transformers at import.
"""
from __future__ import annotations

import logging
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
