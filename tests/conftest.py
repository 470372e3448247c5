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


# --- slurm fixture -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_cluster():
    """The local single-node SLURM cluster (started once if needed): its client env
    (SLURM_CONF, FINELLAMA_SLURM_DIR), also set in os.environ. For tests marked slurm."""
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # tests/ is not a package; pytest's rootdir import usually added it
        sys.path.insert(0, here)
    from slurm_cluster import ensure_cluster

    return ensure_cluster()
