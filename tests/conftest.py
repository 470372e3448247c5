"""Shared fixtures: HF caches in a temp folder, offline hub, and a composed config."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports transformers/datasets: never touch the network or ~/.cache.
_CACHE = os.environ.get("HF_HOME") or tempfile.mkdtemp(prefix="finellama-hf-")
os.environ.setdefault("HF_HOME", _CACHE)
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_config(tmp_path):
    """compose conf/ with overrides into a resolved Config whose run dir is in tmp_path."""
    from finellama_rl.compose import load_config

    def _make(*overrides: str, run_dir: str | None = None):
        return load_config([*overrides, f"run.dir={run_dir or tmp_path / 'run'}"])

    return _make
