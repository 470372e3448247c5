"""Shared fixtures: HF caches in a temp folder, offline hub, and a composed config."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports transformers/datasets: never touch the network or ~/.cache.
_CACHE = os.environ.get("HF_HOME") or tempfile.mkdtemp(prefix="finellama-hf-")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # pytest-xdist (scripts/run_tests.sh): gw0, gw1, ...
if _WORKER:  # each worker its own caches and fit memory: no two processes build or write one at once
    _CACHE = os.path.join(_CACHE, _WORKER)
    os.environ["HF_HOME"] = _CACHE
    os.environ["FINELLAMA_CACHE"] = os.path.join(_CACHE, "finellama_rl")
    if os.environ.get("FINELLAMA_FIT_MEMORY"):
        os.environ["FINELLAMA_FIT_MEMORY"] += f".{_WORKER}"
os.environ.setdefault("HF_HOME", _CACHE)
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The fit memory is per user (~/.local/state): tests write theirs into a temp folder.
os.environ.setdefault("FINELLAMA_FIT_MEMORY", os.path.join(tempfile.mkdtemp(prefix="finellama-fitmem-"), "fit_memory.json"))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_config(tmp_path):
    """compose conf/ with overrides into a resolved Config whose run dir is in tmp_path."""
    from finellama_rl.compose import load_config

    def _make(*overrides: str, run_dir: str | None = None):
        run_dir = Path(run_dir or tmp_path / "run")
        root = tmp_path if tmp_path in run_dir.parents else run_dir.parent  # run.dir must lie under run.results_dir
        return load_config([*overrides, f"run.results_dir={root}", f"run.dir={run_dir}"])

    return _make


# --- a machine without SLURM ------------------------------------------------------------------------
SLURM_BINARIES = ("sbatch", "srun", "sinfo", "squeue", "sacct", "scontrol", "scancel", "salloc", "sbcast", "sattach")


def path_without_slurm(folder: Path, path: str | None = None) -> str:
    """PATH as on a machine where SLURM was never installed: every PATH folder that holds a
    SLURM binary is replaced by `folder`, a folder of symlinks to everything else in it."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        d = Path(entry)
        if not entry or not d.is_dir() or not any((d / b).exists() for b in SLURM_BINARIES):
            out.append(entry)
            continue
        for item in d.iterdir():
            if item.name not in SLURM_BINARIES and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item)
        if str(folder) not in out:
            out.append(str(folder))
    return os.pathsep.join(out)


@pytest.fixture
def no_slurm_path(tmp_path, monkeypatch):
    """This test sees no SLURM binary on PATH (whatever is installed)."""
    import shutil

    monkeypatch.setenv("PATH", path_without_slurm(tmp_path / "no-slurm-bin"))
    assert all(shutil.which(b) is None for b in SLURM_BINARIES)
    return os.environ["PATH"]


def fake_binaries(folder: Path, scripts: dict) -> str:
    """Write executable shell scripts {name: body} into `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body + "\n")
        (folder / name).chmod(0o755)
    return str(folder)


@pytest.fixture
def hf_cache_with_headline(tmp_path, monkeypatch):
    """An HF_HOME whose hub cache holds (empty) snapshots of Qwen2.5-3B-Instruct and GSM8K,
    so the login-node pre-flight finds them offline; for subprocesses (huggingface_hub
    reads HF_HOME at import)."""
    home = tmp_path / "hf_home"
    for kind, repo, files in (("models", "Qwen--Qwen2.5-3B-Instruct", ["config.json"]), ("datasets", "openai--gsm8k", [])):
        base = home / "hub" / f"{kind}--{repo}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text("0" * 40)
        (base / "snapshots" / ("0" * 40)).mkdir(parents=True)
        for f in files:
            (base / "snapshots" / ("0" * 40) / f).write_text("{}")
    return home


# --- slurm ---------------------------------------------------------------------------------------
# Tests marked `slurm` start (and may install) a local SLURM cluster: they run only when asked for,
# with `-m slurm` (scripts/run_tests.sh phase 2, `make test`) or FINELLAMA_SLURM_TESTS=1, so that
# `pytest tests/test_sbatch_scripts.py` never starts a cluster.
def pytest_collection_modifyitems(config, items):
    long_files_first(items)
    if "slurm" in (config.option.markexpr or "") or os.environ.get("FINELLAMA_SLURM_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs the local SLURM cluster: run with -m slurm (make test does)")
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node SLURM cluster (started once if needed): its client env
    (SLURM_CONF, FINELLAMA_SLURM_DIR), also set in os.environ. For tests marked slurm.
    FINELLAMA_NO_CLUSTER=1 (the fresh-machine phase of scripts/run_tests.sh) forbids starting it."""
    import sys

    if os.environ.get("FINELLAMA_NO_CLUSTER") == "1":
        pytest.fail("this test session must not start the SLURM cluster (FINELLAMA_NO_CLUSTER=1)")

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # tests/ is not a package; pytest's rootdir import usually added it
        sys.path.insert(0, here)
    from slurm_cluster import ensure_cluster

    return ensure_cluster()


# --- a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs (needs root; skipped elsewhere), for a real ENOSPC (fill it with fill_until_full)."""
    import gc
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    gc.collect()  # a failed torch.save may still hold its file open
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_until_full(path: Path) -> None:
    """Write zeros into `path` until its file system says ENOSPC (a save a full disk cut short)."""
    import errno

    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


# --- order: the longest files first --------------------------------------------------------------
# scripts/run_tests.sh runs phase 1 on two pytest-xdist workers, a test file per worker, in
# collection order: a long file collected late leaves one worker idle at the end (test_learning's
# six RL runs, about 6 minutes, ran alone for the last 5 of a 13-minute phase 1).
LONG_FILES_FIRST = ("test_learning.py", "test_distributed.py", "test_evaluate.py", "test_grpo_split.py", "test_demo.py",
                    "test_ladder_run.py", "test_ppo.py", "test_grpo.py", "test_sft.py", "test_rm_trainer.py")


def long_files_first(items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: order within a file kept
