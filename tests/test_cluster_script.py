"""scripts/slurm_cluster/cluster.sh trusts nothing it did not make: a state folder owned
by someone else (or a symlink) is refused before anything runs, and a pid file that
names another process never gets it killed. These start no daemon (not marked slurm)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "slurm_cluster" / "cluster.sh"


def run_script(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINELLAMA_SLURM_DIR": str(state), "FINELLAMA_SLURM_PORT_BASE": "27817"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def stat_start(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a folder to another user")
def test_state_folder_owned_by_someone_else_is_refused(tmp_path):
    state = tmp_path / "state"
    (state / "munge").mkdir(parents=True)
    (state / "munge" / "munge.key").write_bytes(b"planted" * 200)
    os.chown(state, 65534, 65534)
    proc = run_script(state, "start")
    assert proc.returncode == 1 and "not a folder owned by uid 0" in proc.stderr, proc.stdout + proc.stderr
    assert "installing" not in proc.stdout and "starting" not in proc.stdout


def test_state_folder_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    proc = run_script(tmp_path / "link", "stop")
    assert proc.returncode == 1 and "is a symlink" in proc.stderr


def test_new_state_folder_is_private(tmp_path):
    proc = run_script(tmp_path / "fresh", "stop")  # creates the folder, stops nothing
    assert proc.returncode == 0, proc.stderr
    assert oct((tmp_path / "fresh").stat().st_mode & 0o777) == "0o700"


def test_pid_file_of_another_process_is_never_signalled(tmp_path):
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True, mode=0o755)
    state.chmod(0o700)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        # the right pid and start time, but the process is not slurmd: a planted or stale pid file
        (state / "pids" / "slurmd").write_text(f"{victim.pid} {stat_start(victim.pid)}\n")
        proc = run_script(state, "stop")
        assert proc.returncode == 0, proc.stderr
        assert "stopping slurmd" not in proc.stdout and victim.poll() is None, "cluster.sh killed a process it did not start"
    finally:
        victim.kill()
        victim.wait()


def test_script_binds_to_localhost_and_generates_secrets():
    text = SCRIPT.read_text()
    assert "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" in text and "--bind-address=127.0.0.1" in text
    assert "finellama-slurm\"" not in text.split("DB_USER=")[1].split("\n")[1]  # no constant password
    assert "(umask 077 && dd if=/dev/urandom of=\"$MUNGE_KEY\"" in text


@pytest.mark.parametrize("nodes", ["0", "5", "two", ""])
def test_bad_node_count_is_refused_before_anything_starts(tmp_path, nodes):
    proc = run_script(tmp_path / "state", "start", "--nodes", nodes) if nodes else run_script(tmp_path / "state", "start", "--nodes")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "node count must be 1..4" in proc.stderr or "--nodes needs a number" in proc.stderr
    assert "installing" not in proc.stdout and "starting" not in proc.stdout


def test_pid_file_of_a_second_node_naming_another_process_is_never_signalled(tmp_path):
    """Several nodes: one pid file per slurmd (pids/slurmd.<node>); stop checks each like the others."""
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True, mode=0o755)
    (state / "etc").mkdir(mode=0o755)
    (state / "etc" / "nodes").write_text("2\n")
    state.chmod(0o700)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        (state / "pids" / "slurmd.node-2").write_text(f"{victim.pid} {stat_start(victim.pid)}\n")
        proc = run_script(state, "stop")
        assert proc.returncode == 0, proc.stderr
        assert "stopping" not in proc.stdout and victim.poll() is None, "cluster.sh killed a process it did not start"
        status = run_script(state, "status")
        assert status.returncode == 1 and "nodes: 2" in status.stdout and "slurmd." in status.stdout
    finally:
        victim.kill()
        victim.wait()
