"""finellama_rl.report on a hand-built sweep: the numbers in report.md's table, PNGs that
decode at the expected size, a self-contained report.html, and a headless-Chromium
screenshot of that page that shows the table."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from finellama_rl import report
from finellama_rl.compose import load_config
from finellama_rl.results import append_jsonl, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
PNG_SHAPE = (450, 800)  # report.FIG_SIZE_IN * report.FIG_DPI


def eval_doc(name: str, step: int, strict: float, lenient: float, n: int, baseline=None) -> dict:
    correct = {"strict": round(strict * n), "lenient": round(lenient * n)}
    doc = {"schema_version": 1, "run": name, "sweep": "sw", "step": step, "date": "2026-01-01T00:00:00",
           "accuracy": {"strict": strict, "lenient": lenient}, "correct": correct, "total": n,
           "protocol": {"decoding": "greedy", "shots": 0}, "records": []}
    if baseline is not None:
        doc["baseline"] = {k: v for k, v in baseline.items() if k != "records"}
    return doc


def make_run(sweep: Path, name: str, overrides, rewards, losses, elapsed_s) -> Path:
    """config.yaml composed from the real conf/, and metrics.jsonl."""
    from finellama_rl.train import config_yaml

    run = sweep / name
    cfg = load_config([*overrides, f"run.dir={run}", "run.sweep=sw", f"run.name={name}"])
    atomic_write_text(run / "config.yaml", config_yaml(cfg))
    for i, (r, l) in enumerate(zip(rewards, losses), start=1):
        append_jsonl(run / "metrics.jsonl", {"step": i, "train/reward_mean": r, "train/loss": l,
                                             "time/elapsed_s": elapsed_s * i / len(rewards)})
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    sw = tmp_path / "sw"
    # A finished GRPO run on CPU: baseline 20/30 % -> final 50/60 % on 50 problems, one mid-run eval.
    a = make_run(sw, "grpo-tiny-cpu", ["experiment=smoke", "trainer=grpo"], [0.1, 0.2, 0.4, 0.5], [1.0, 0.8, 0.7, 0.5], 3000)
    base_a = eval_doc("grpo-tiny-cpu", 0, 0.2, 0.3, 50)
    atomic_write_json(a / "eval_baseline.json", base_a)
    atomic_write_json(a / "evals" / "step_000002.json", eval_doc("grpo-tiny-cpu", 2, 0.34, 0.44, 50))
    atomic_write_json(a / "eval_results.json", eval_doc("grpo-tiny-cpu", 4, 0.5, 0.6, 50, baseline=base_a))
    atomic_write_json(a / "training_stats.json", {"summary": {"wall_time_s_this_attempt": 3600.0}})
    # A finished PPO run on 2 GPUs after two out-of-memory attempts; worse than its baseline.
    b = make_run(sw, "ppo-tiny-a100_80", ["experiment=smoke", "trainer=ppo", "hardware=a100_80",
                                          "hardware.gpus_per_node=2", "trainer.micro_batch=2"], [0.3, 0.2], [0.9, 1.1], 100)
    base_b = eval_doc("ppo-tiny-a100_80", 0, 0.4, 0.5, 40)
    atomic_write_json(b / "eval_results.json", eval_doc("ppo-tiny-a100_80", 2, 0.35, 0.55, 40, baseline=base_b))
    for outcome, mb, wall, err in [("oom", 4, 600, "OutOfMemoryError: CUDA out of memory"), ("oom", 2, 300, "OutOfMemoryError"),
                                   ("completed", 1, 3000, None)]:
        append_jsonl(b / "attempts.jsonl", {"rung": mb, "micro_batch": mb, "outcome": outcome, "wall_time_s": wall, "error": err})
    # A run still training: metrics and a baseline, no final eval, no attempts.jsonl.
    c = make_run(sw, "grpo-tiny-cpu-lr", ["experiment=smoke", "trainer=grpo", "trainer.learning_rate=1e-4"], [0.0, 0.1, 0.1], [1.2, 1.1, 1.0], 90)
    atomic_write_json(c / "eval_baseline.json", eval_doc("grpo-tiny-cpu-lr", 0, 0.1, 0.15, 20))
    return sw


def parse_table(markdown: str):
    lines = [l for l in markdown.splitlines() if l.startswith("|") and not l.startswith("|-")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    return [dict(zip(cells[0], row)) for row in cells[1:]]


def test_report_table_has_the_right_numbers(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = {r["run"]: r for r in parse_table((out / "report.md").read_text())}
    assert list(rows) == ["grpo-tiny-cpu", "grpo-tiny-cpu-lr", "ppo-tiny-a100_80"]
    a, b, c = rows["grpo-tiny-cpu"], rows["ppo-tiny-a100_80"], rows["grpo-tiny-cpu-lr"]
    assert (a["model"], a["trainer"], a["hardware"], a["steps"]) == ("tiny", "grpo", "cpu", "4")
    assert (a["wall time"], a["GPU-hours"], a["OOM attempts"], a["eval n"]) == ("1:00:00", "0.00", "0", "50")
    assert [float(a[k]) for k in ("baseline strict %", "baseline lenient %", "final strict %", "final lenient %")] == [20.0, 30.0, 50.0, 60.0]
    assert (float(a["Δ strict (pp)"]), float(a["Δ lenient (pp)"])) == (30.0, 30.0)
    # 600 + 300 + 3000 s over attempts on 2 GPUs
    assert (b["trainer"], b["hardware"], b["steps"], b["wall time"], b["OOM attempts"]) == ("ppo", "a100_80", "2", "1:05:00", "2")
    assert float(b["GPU-hours"]) == pytest.approx(3900 / 3600 * 2, abs=0.005)
    assert (float(b["Δ strict (pp)"]), float(b["Δ lenient (pp)"])) == (-5.0, 5.0)
    assert (c["steps"], c["wall time"], c["OOM attempts"], c["final strict %"], c["Δ strict (pp)"]) == ("3", "0:01:30", "0", "-", "-")
    assert float(c["baseline strict %"]) == 10.0
    printed = capsys.readouterr().out
    assert "| grpo-tiny-cpu " in printed and "report.html" in printed


def test_report_pngs_decode_at_the_expected_size(sweep, tmp_path):
    import matplotlib.image as mpimg

    rep = report.write_report(sweep, tmp_path / "out")
    assert sorted(rep.images) == sorted(report.PLOTS)
    for name, path in rep.images.items():
        img = mpimg.imread(path)
        assert img.shape[:2] == PNG_SHAPE, name
        assert img[..., :3].std() > 0.05, f"{name}.png looks blank"
        assert f"![{name}]({name}.png)" in rep.markdown.read_text()
    acc = {r.name: r.points for r in rep.runs}
    assert acc["grpo-tiny-cpu"] == [(0, 0.2, 0.3, 50), (2, 0.34, 0.44, 50), (4, 0.5, 0.6, 50)]
    assert acc["ppo-tiny-a100_80"] == [(0, 0.4, 0.5, 40), (2, 0.35, 0.55, 40)]  # baseline from eval_results.json
    assert acc["grpo-tiny-cpu-lr"] == [(0, 0.1, 0.15, 20)]


def test_report_defaults_to_the_sweep_folder_and_bad_input_exits_2(sweep, tmp_path, capsys):
    from finellama_rl.compose import cli_main

    assert report.main([str(sweep)]) == 0
    assert (sweep / "report.md").is_file() and (sweep / "reward.png").is_file()
    for bad in ([str(tmp_path / "nope")], [str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            cli_main(report.main, bad)
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error: sweep: ")


def test_html_is_self_contained(sweep, tmp_path):
    rep = report.write_report(sweep, tmp_path / "out")
    page = rep.html.read_text()
    assert "<table id='runs'>" in page and page.count("<tr>") == 1 + 3
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "external resource in report.html"
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "<td class='pos'>+30.0</td>" in page and "<td class='neg'>-5.0</td>" in page


def chromium() -> str:
    """Path to chromium, installing Debian's package with scripts/install_chromium.sh if needed."""
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get is unavailable to install it (scripts/install_chromium.sh)")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"cannot install chromium: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return shutil.which("chromium")


def test_html_screenshot_in_headless_chromium_shows_the_table(sweep, tmp_path):
    from PIL import Image

    rep = report.write_report(sweep, tmp_path / "out")
    shot = tmp_path / "screenshot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           f"file://{rep.html}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900)
    px = np.asarray(img).astype(int)
    assert px.std() > 20, "the screenshot is blank"
    # The table header is dark blue (#1f3b5c) near the top: the table rendered.
    header = (np.abs(px - np.array([0x1F, 0x3B, 0x5C])).sum(axis=2) < 30)
    rows_hit = np.nonzero(header.any(axis=1))[0]
    assert header.sum() > 2000 and rows_hit.min() < 200, "no table header in the screenshot"
    # Dark text on the (light) body rows just below the header.
    below = px[rows_hit.max() + 2 : rows_hit.max() + 80, :600]
    assert (below.sum(axis=2) < 200).sum() > 200, "no text in the table rows"
    shutil.copy(shot, rep.html.with_name("screenshot.png"))  # kept next to the report for a human look
