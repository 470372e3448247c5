"""Safe writes and tolerant reads of run-folder files: the umask is honoured (shared
results folders), a full disk says so and leaves the previous file (PNGs too), readers
skip what a crash or a hand edit leaves behind, config.yaml is never interpolated."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import fill_until_full

from finellama_rl import fileio
from finellama_rl.fileio import append_jsonl, atomic_output, atomic_write_json, atomic_write_text, fraction_or_none, is_disk_full, read_json_object, read_jsonl, read_run_config_data
from finellama_rl.errors import DiskFullError, RunConfigUnreadable


@pytest.fixture
def umask002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_written_files_honour_the_umask(tmp_path, umask002):
    atomic_write_json(tmp_path / "eval_results.json", {"a": 1})
    atomic_write_text(tmp_path / "report.md", "x")
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
    for name in ("eval_results.json", "report.md", "metrics.jsonl"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o664, f"{name}: {oct(mode)} (group-readable and -writable under umask 002)"
    assert fileio.current_umask() == 0o002


def test_default_umask_gives_0644(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_disk_full_says_so_and_keeps_the_previous_file(tiny_disk):
    target = tiny_disk / "eval_results.json"
    atomic_write_json(target, {"accuracy": 0.5})
    fill_until_full(tiny_disk / "filler")
    with pytest.raises(DiskFullError) as err:
        atomic_write_json(target, {"accuracy": 0.75, "records": ["x" * 100] * 5000})
    assert "disk full" in str(err.value) and str(target) in str(err.value)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["eval_results.json", "filler"]  # no temp file left
    with pytest.raises(DiskFullError):
        append_jsonl(tiny_disk / "metrics.jsonl", {"step": 1, "pad": "x" * 300000})


def test_png_on_a_full_disk_leaves_the_previous_image(tiny_disk):
    from finellama_rl.eval.sweep_report import _figure, _save

    png = tiny_disk / "reward.png"
    fig, ax = _figure("t", "step", "reward")
    ax.plot([1, 2], [0.1, 0.2], label="run")
    _save(fig, ax, png, True)
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG")
    fill_until_full(tiny_disk / "filler")
    fig, ax = _figure("t", "step", "reward")
    ax.plot(range(500), range(500), label="run")
    with pytest.raises(DiskFullError):
        _save(fig, ax, png, True)
    assert png.read_bytes() == before  # never a truncated PNG


def test_torch_disk_full_is_recognised(tiny_disk):
    import torch

    fill_until_full(tiny_disk / "filler")
    with pytest.raises(Exception) as err:
        torch.save(torch.zeros(100000), tiny_disk / "optimizer.pt")
    assert is_disk_full(err.value, tiny_disk), repr(err.value)
    assert not is_disk_full(RuntimeError("shape mismatch"), tiny_disk)
    (tiny_disk / "filler").unlink()
    assert not is_disk_full(err.value, tiny_disk)  # the same words with space left: not a full disk


def test_atomic_output_removes_the_temp_file_on_error(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output(tmp_path / "a.txt") as tmp:
            tmp.write_text("new")
            raise ValueError("boom")
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_read_jsonl_skips_bad_lines_with_one_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": "2"}\n[3]\nnot json\n{"loss": 1}\n{"step": 4}\n{"step": 5, "tor')
    assert read_jsonl(path, require={"step": int}) == [{"step": 1}, {"step": 4}]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 5 malformed line(s) (first: line 2: not UTF-8)" in err[0]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    path.write_bytes(b'{"step": 1}\n{"step": 2, "tor')  # only a torn last line: silent (a crash mid-write)
    assert read_jsonl(path, require={"step": int}) == [{"step": 1}] and capsys.readouterr().err == ""


def test_read_json_object_and_fractions(tmp_path, capsys):
    (tmp_path / "a.json").write_bytes(b"\x80\x81")
    (tmp_path / "b.json").write_text("[1, 2]")
    (tmp_path / "c.json").write_text('{"accuracy": 0.5}')
    assert read_json_object(tmp_path / "a.json") is None and read_json_object(tmp_path / "b.json") is None
    assert read_json_object(tmp_path / "c.json", require={"accuracy": dict}) is None
    assert read_json_object(tmp_path / "c.json") == {"accuracy": 0.5}
    assert fraction_or_none(7.5, "x") is None and fraction_or_none(True, "x") is None and fraction_or_none(0.25, "x") == 0.25
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "not a JSON object" in err and "7.5 is outside [0, 1]" in err


def test_run_config_interpolations_are_never_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELLAMA_TEST_SECRET", "hf_secret_value")
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  system_prompt: ${oc.env:FINELLAMA_TEST_SECRET}\nrun: {name: x}\nevil: !!python/object/apply:os.system ['touch /tmp/finellama-pwned']\n")
    with pytest.raises(RunConfigUnreadable):  # the YAML safe loader constructs no objects
        read_run_config_data(path)
    assert not Path("/tmp/finellama-pwned").exists()
    path.write_text("data:\n  system_prompt: ${oc.env:FINELLAMA_TEST_SECRET}\nrun: {name: x}\n")
    assert read_run_config_data(path, escape=False)["data"]["system_prompt"] == "${oc.env:FINELLAMA_TEST_SECRET}"
    from omegaconf import OmegaConf

    merged = OmegaConf.create(read_run_config_data(path))
    assert OmegaConf.to_container(merged, resolve=True)["data"]["system_prompt"] == "${oc.env:FINELLAMA_TEST_SECRET}"
    path.write_bytes(b"run: {name: \xff}\n")
    with pytest.raises(RunConfigUnreadable, match="not UTF-8"):
        read_run_config_data(path)


def test_evaluate_reads_a_run_config_without_resolving_it(tmp_path, make_config, monkeypatch):
    """`${oc.env:...}` planted in a run's config.yaml reaches no output: evaluate's config keeps the text."""
    from finellama_rl.evaluate import load_run_config
    from finellama_rl.compose import config_yaml

    monkeypatch.setenv("FINELLAMA_TEST_SECRET", "hf_secret_value")
    import yaml

    cfg = make_config("experiment=smoke")
    Path(cfg.run.dir).mkdir(parents=True)
    data = yaml.safe_load(config_yaml(cfg))
    data["data"]["system_prompt"] = "${oc.env:FINELLAMA_TEST_SECRET}"
    (Path(cfg.run.dir) / "config.yaml").write_text(yaml.safe_dump(data))
    loaded = load_run_config(Path(cfg.run.dir))
    assert loaded.data.system_prompt == "${oc.env:FINELLAMA_TEST_SECRET}"
    assert "hf_secret_value" not in json.dumps(loaded, default=lambda o: getattr(o, "__dict__", str(o)))
