"""Hostile or mistaken input never reaches a shell, a submission script or the wrong
folder: names are safe path components, SLURM strings carry no control characters,
run folders stay under run.results_dir, site-file mistakes name the file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from finellama_rl import launch
from finellama_rl.compose import load_config
from finellama_rl.errors import ConfigError
from finellama_rl.login.slurm import sbatch_preview

PWNED = Path("/tmp/finellama-pwned")

# (override, key named in the error)
REFUSED = [
    ("run.name='x\ntouch /tmp/finellama-pwned #'", "run.name"),
    ("run.name='$(touch /tmp/finellama-pwned)'", "run.name"),
    ("run.name='`touch /tmp/finellama-pwned`'", "run.name"),
    ("run.name=..", "run.name"),
    ("run.name=a/b", "run.name"),
    ("run.name='../../escape'", "run.name"),
    ("run.sweep=..", "run.sweep"),
    ("run.sweep='s\n#SBATCH --mem=1'", "run.sweep"),
    ("hardware.slurm.account='proj\n#SBATCH --partition=root'", "hardware.slurm.account"),
    ("hardware.slurm.account='$(touch /tmp/finellama-pwned)'", "hardware.slurm.account"),
    ("hardware.slurm.partition='debug\ntouch /tmp/finellama-pwned'", "hardware.slurm.partition"),
    ("hardware.slurm.qos='`id`'", "hardware.slurm.qos"),
    ("hardware.slurm.constraint='a100\n#SBATCH --mem=1'", "hardware.slurm.constraint"),
    ("+hardware.slurm.additional.comment='ok\ntouch /tmp/finellama-pwned'", "hardware.slurm.additional.comment"),
    ("+hardware.slurm.additional.mail-type='END\r#SBATCH --mem=1'", "hardware.slurm.additional.mail-type"),
    ("+hardware.slurm.additional.Mail_Type=END", "hardware.slurm.additional.Mail_Type"),
    ("+hardware.slurm.additional.output=/tmp/x", "hardware.slurm.additional.output"),
    ("+hardware.slurm.additional.mem=1G", "hardware.slurm.additional.mem"),
    ("run.results_dir='/tmp/r\n#SBATCH --mem=1'", "run.results_dir"),
]


@pytest.mark.parametrize("override, key", REFUSED)
def test_hostile_input_is_refused_before_anything_is_written(override, key, tmp_path):
    results = tmp_path / "results"
    args = ["experiment=smoke", "launcher=slurm", "dry_run=true", f"run.results_dir={results}", override]
    if override.startswith("run.results_dir"):
        args.remove(f"run.results_dir={results}")
    with pytest.raises(ConfigError) as err:
        launch.main(args)
    assert err.value.key == key, err.value
    assert not results.exists() and not PWNED.exists()


def test_hostile_site_file_key_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text('hardware:\n  cpu:\n    slurm:\n      additional:\n        "mail-type\\n#SBATCH --mem=1": END\n')
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke", f"site={site}", f"run.results_dir={tmp_path}"])
    # one clean line that names the key as Python writes it, and the file
    assert err.value.key == "site" and "\n" not in str(err.value), err.value
    assert "key hardware.cpu.slurm.additional.'mail-type\\n#SBATCH --mem=1'" in err.value.message
    assert "contains a control character" in err.value.message and str(site) in err.value.message
    site.write_text('slurm:\n  "account\\ntouch /tmp/finellama-pwned": x\n')
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke", f"site={site}", f"run.results_dir={tmp_path}"])
    assert "key slurm.'account\\ntouch /tmp/finellama-pwned'" in err.value.message and "\n" not in str(err.value)
    assert str(site) in err.value.message and not PWNED.exists()
    site.write_text('hardware:\n  "a100_80\\nx":\n    slurm: {partition: fat}\n')
    with pytest.raises(ConfigError, match=r"key hardware.'a100_80\\nx' in .* contains a control character"):
        load_config(["experiment=smoke", f"site={site}", f"run.results_dir={tmp_path}"])


# values that are legal (SLURM accepts them) but look dangerous: they must stay inside #SBATCH lines
ACCEPTED = [
    "+hardware.slurm.additional.comment='$(touch /tmp/finellama-pwned) `id` ; rm -rf ~'",
    "+hardware.slurm.additional.mail-user='me@example.org'",
    "hardware.slurm.constraint='a100&(ib|eth)'",
    "run.results_dir='{tmp}/dir with spaces, commas = and $(touch /tmp/finellama-pwned)'",
]


@pytest.mark.parametrize("override", ACCEPTED)
def test_every_line_before_the_command_is_a_directive(override, tmp_path, no_slurm_path):
    cfg = load_config(["experiment=smoke", f"run.results_dir={tmp_path}", "run.sweep=s", override.format(tmp=tmp_path)])
    text = sbatch_preview(cfg)
    lines = text.splitlines()
    head = lines[:lines.index("# command")]
    assert all(line == "" or line.startswith("#") for line in head), head
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # and it parses as one script
    assert not PWNED.exists()


@pytest.mark.parametrize("args, needle", [
    (["run.dir=."], "is not inside run.results_dir"),
    (["run.dir=/tmp"], "is not inside run.results_dir"),
    (["run.dir={root}"], "is not inside run.results_dir"),
    (["run.dir={root}/s1"], "holds other runs"),
    (["run.dir={root}/s1/done/nested"], "lies inside the run folder"),
    (["run.dir={root}/file.txt"], "is a file"),
])
def test_run_folder_outside_results_or_inside_another_run_is_refused(args, needle, tmp_path):
    root = tmp_path / "results"
    (root / "s1" / "done").mkdir(parents=True)
    (root / "s1" / "done" / "config.yaml").write_text("run: {}\n")
    (root / "file.txt").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as err:
        launch.main(["experiment=smoke", "launcher=local", "run.resume=false", f"run.results_dir={root}",
                     *[a.format(root=root) for a in args]])
    assert err.value.key == "run.dir" and needle in err.value.message, err.value
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing moved


def test_run_folder_outside_results_when_explicitly_allowed(tmp_path):
    cfg = load_config(["experiment=smoke", f"run.dir={tmp_path / 'mine'}", "run.allow_outside_results_dir=true"])
    assert cfg.run.dir == str(tmp_path / "mine")


@pytest.mark.parametrize("make_root, needle", [
    (lambda p: [(p / "a_file").write_text("x"), p / "a_file" / "results"][-1], "is a file, not a folder"),
    (lambda p: Path("/proc/finellama-results"), "lies in the system folder /proc"),  # refused before any write is tried
])
def test_results_dir_that_cannot_hold_files_exits_2(make_root, needle, tmp_path):
    root = make_root(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.launch", "experiment=smoke", "launcher=local",
                           f"run.results_dir={root}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "run.results_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, key, needle", [
    ("slurm: {account: [unclosed\n", "site", "is not valid YAML"),
    ("hardware:\n  a100-80:\n    slurm: {partition: fat}\n", "site:hardware.a100-80", "Did you mean a100_80?"),
    ("slurm: {acount: x}\n", "site:hardware.slurm.acount", "in site file"),
    ("clusters: {}\n", "site:clusters", "unknown section"),
])
def test_site_file_mistakes_name_the_file(content, key, needle, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke", f"site={site}"], resolve_paths=False)
    assert err.value.key == key and needle in err.value.message and str(site) in err.value.message, err.value


def test_missing_site_file_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELLAMA_SITE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke"], resolve_paths=False)
    assert "FINELLAMA_SITE=" in err.value.message and "nope.yaml" in err.value.message


def test_site_file_sits_under_the_command_line(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("slurm: {account: proj42, qos: normal}\nhardware:\n  cpu:\n    slurm: {partition: fat}\n")
    cfg = load_config(["experiment=smoke", f"site={site}", "hardware.slurm.qos=high"], resolve_paths=False)
    assert (cfg.hardware.slurm.account, cfg.hardware.slurm.qos, cfg.hardware.slurm.partition) == ("proj42", "high", "fat")


def test_pwned_marker_absent_at_the_end():
    assert not PWNED.exists() and not (REPO / "x").exists() and "finellama-pwned" not in os.listdir("/tmp")
