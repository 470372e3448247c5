"""Helper for tests that need a real SLURM cluster (tests marked ``slurm``).

``ensure_cluster()`` runs ``scripts/slurm_cluster/cluster.sh start --nodes 2`` once
per process (it installs the Debian packages if missing and brings up munged,
MariaDB, slurmdbd, slurmctld and two slurmd daemons on this machine as two nodes;
it needs root), then
puts the client environment (``SLURM_CONF``, ``FINELLAMA_SLURM_DIR``) into
``os.environ`` and returns it. The cluster is left running after the tests;
``cluster.sh stop`` stops it. The state dir defaults to /tmp/finellama-slurm
(env ``FINELLAMA_SLURM_DIR``).

Two nodes, always (env ``FINELLAMA_SLURM_NODES`` overrides): the multi-node tests need
them, and switching the node count of a running cluster requeues the jobs running then
and strands pending ones that need the old nodes, so every test session asks for the
same layout and nobody switches it mid-run. The nodes share this machine's CPUs (each
declares all of them), so up to twice as many one-CPU jobs run at once as on one node.

This module holds no tests; wire it into a fixture, e.g.::

    @pytest.fixture(scope="session")
    def slurm_env():
        return ensure_cluster()
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster" / "cluster.sh"

# First bring-up includes apt-get; later ones take a few seconds.
START_TIMEOUT_S = 600.0

_lock = threading.Lock()
_env: dict[str, str] | None = None
_error: RuntimeError | None = None


def _run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _describe(what: str, stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    def text(s: str | bytes | None) -> str:
        if s is None:
            return ""
        return s.decode(errors="replace") if isinstance(s, bytes) else s

    return (
        f"{what}\n--- stdout ---\n{text(stdout).rstrip()}\n--- stderr ---\n{text(stderr).rstrip()}"
    )


def _parse_exports(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def nodes() -> str:
    """The node count the tests' cluster runs with (2 unless FINELLAMA_SLURM_NODES says otherwise)."""
    return os.environ.get("FINELLAMA_SLURM_NODES") or "2"


def _start() -> dict[str, str]:
    cmd = f"{CLUSTER_SCRIPT} start --nodes {nodes()}"
    try:
        proc = _run_script(["start", "--nodes", nodes()], START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            _describe(f"`{cmd}` did not finish within {START_TIMEOUT_S:.0f}s", exc.stdout, exc.stderr)
        ) from None
    except OSError as exc:
        raise RuntimeError(f"could not run `{cmd}`: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            _describe(f"`{cmd}` failed with exit code {proc.returncode}", proc.stdout, proc.stderr)
        )

    env_proc = _run_script(["env"], 60)
    env = _parse_exports(env_proc.stdout)
    if env_proc.returncode != 0 or "SLURM_CONF" not in env:
        raise RuntimeError(
            _describe(
                f"`{CLUSTER_SCRIPT} env` failed (exit code {env_proc.returncode})",
                env_proc.stdout,
                env_proc.stderr,
            )
        )
    return env


def ensure_cluster() -> dict[str, str]:
    """Start the test cluster if needed; return its client env and set it in os.environ.

    The script runs once per process; later calls (and calls after a failure)
    return the cached result (or raise the cached error) at once.

    Raises:
        RuntimeError: the cluster could not be started; the message holds the
            script's output (progress lines and the tail of the failing
            daemon's log).
    """
    global _env, _error
    with _lock:
        if _error is not None:
            raise _error
        if _env is None:
            try:
                _env = _start()
            except RuntimeError as exc:
                _error = exc
                raise
        os.environ.update(_env)
        return dict(_env)
