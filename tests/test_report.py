"""finellama_rl.report on a hand-built sweep: accuracy with its 95% Wilson interval and
the exact McNemar test against the baseline and between runs (equal to the statistics
module's values on the sweep's per-problem records), "not significant" where it is not,
no comparison or curve across protocols, schema-1 eval files still read, PNGs that decode
at the expected size, a self-contained report.html, and a headless-Chromium screenshot
of that page that shows the table and its significance column."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from finellama_rl import report
from finellama_rl.eval import sweep_report
from finellama_rl.compose import load_config
from finellama_rl.eval.statistics import mcnemar_exact, wilson_interval
from finellama_rl.fileio import append_jsonl, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
PNG_SHAPE = (450, 800)  # sweep_report.FIG_SIZE_IN * sweep_report.FIG_DPI
V1_FIXTURE = REPO / "tests" / "fixtures" / "eval_results_v1.json"
N = 60


def eval_doc(name: str, step: int, correct, protocol: str = "qwen_boxed", primary: str = "math_verify",
             baseline=None, strict=None, split=None) -> dict:
    """A schema-2 eval document with per-problem records (problem i is `correct[i]`)."""
    n, c = len(correct), sum(correct)
    strict = strict if strict is not None else [False] * n
    records = [{"index": i, "question": f"problem {i}", "reference": str(i), "completion": "...",
                "correct": {primary: bool(ok), "strict": bool(st), "lenient": bool(ok)}} for i, (ok, st) in enumerate(zip(correct, strict))]
    doc = {"schema_version": 2, "run": name, "sweep": "sw", "step": step, "date": f"2026-11-30T00:00:{step:02d}",
           "primary": primary, "protocol": {"name": protocol, "primary": primary, "shots": 0},
           "accuracy": {primary: c / n, "strict": sum(strict) / n, "lenient": c / n},
           "correct": {primary: c, "strict": sum(strict), "lenient": c}, "total": n,
           "ci95": {primary: list(wilson_interval(c, n))}, "records": records}
    if baseline is not None:
        doc["baseline"] = {k: v for k, v in baseline.items() if k != "records"}
    if split is not None:  # absent: an eval file from before splits were recorded (test)
        doc["split"] = {"name": split, "size": n}
    return doc


def vector(*runs):
    """[(value, count), ...] -> a list of booleans."""
    out = []
    for value, count in runs:
        out += [value] * count
    return out


# Per-problem correctness on the same 60 problems.
BASE = vector((True, 20), (False, 40))                                 # 20/60
GRPO_FINAL = vector((True, 18), (False, 2), (True, 20), (False, 20))  # 38/60: fixes 20, breaks 2 -> significant
GRPO_MID = vector((True, 20), (True, 5), (False, 35))                 # 25/60
PPO_FINAL = vector((True, 17), (False, 3), (True, 6), (False, 34))    # 23/60: fixes 6, breaks 3 -> not significant


def make_run(sweep: Path, name: str, overrides, rewards, losses, elapsed_s) -> Path:
    """config.yaml composed from the real conf/, and metrics.jsonl."""
    from finellama_rl.compose import config_yaml

    run = sweep / name
    cfg = load_config([*overrides, f"run.dir={run}", f"run.results_dir={sweep.parent}", "run.sweep=sw", f"run.name={name}"])
    atomic_write_text(run / "config.yaml", config_yaml(cfg))
    for i, (r, l) in enumerate(zip(rewards, losses), start=1):
        append_jsonl(run / "metrics.jsonl", {"step": i, "train/reward_mean": r, "train/loss": l,
                                             "time/elapsed_s": elapsed_s * i / len(rewards)})
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    sw = tmp_path / "sw"
    # A finished GRPO run on CPU: 20/60 -> 38/60 under qwen_boxed, one mid-run eval, and one
    # extra evaluation of its last checkpoint under lm_eval_gsm8k (a separate curve).
    a = make_run(sw, "grpo-tiny-cpu", ["experiment=smoke", "trainer=grpo"], [0.1, 0.2, 0.4, 0.5], [1.0, 0.8, 0.7, 0.5], 3000)
    base_a = eval_doc("grpo-tiny-cpu", 0, BASE)
    atomic_write_json(a / "eval_baseline.json", base_a)
    atomic_write_json(a / "evals" / "step_000002.json", eval_doc("grpo-tiny-cpu", 2, GRPO_MID, split="validation"))
    atomic_write_json(a / "eval_results.json", eval_doc("grpo-tiny-cpu", 4, GRPO_FINAL, baseline=base_a, strict=BASE))
    atomic_write_json(a / "evals" / "step_000004-lm_eval_gsm8k-n60-greedy.json",
                      eval_doc("grpo-tiny-cpu", 4, PPO_FINAL, protocol="lm_eval_gsm8k", primary="lm_eval_strict"))
    atomic_write_json(a / "training_stats.json", {"summary": {"wall_time_s_this_attempt": 3600.0}})
    # A finished PPO run on 2 GPUs after two out-of-memory attempts: not significantly better.
    b = make_run(sw, "ppo-tiny-a100_80", ["experiment=smoke", "trainer=ppo", "hardware=a100_80",
                                          "hardware.gpus_per_node=2", "trainer.micro_batch=2"], [0.3, 0.2], [0.9, 1.1], 100)
    base_b = eval_doc("ppo-tiny-a100_80", 0, BASE)
    atomic_write_json(b / "eval_baseline.json", base_b)
    atomic_write_json(b / "eval_results.json", eval_doc("ppo-tiny-a100_80", 2, PPO_FINAL, baseline=base_b))
    for outcome, mb, wall, err in [("oom", 4, 600, "OutOfMemoryError: CUDA out of memory"), ("oom", 2, 300, "OutOfMemoryError"),
                                   ("completed", 1, 3000, None)]:
        append_jsonl(b / "attempts.jsonl", {"rung": mb, "micro_batch": mb, "outcome": outcome, "wall_time_s": wall, "error": err})
    # A run still training: metrics and a baseline, no final eval, no attempts.jsonl.
    c = make_run(sw, "grpo-tiny-cpu-lr", ["experiment=smoke", "trainer=grpo", "trainer.learning_rate=1e-4"], [0.0, 0.1, 0.1], [1.2, 1.1, 1.0], 90)
    atomic_write_json(c / "eval_baseline.json", eval_doc("grpo-tiny-cpu-lr", 0, BASE[10:30]))
    # A run from before eval protocols: a schema-1 eval file (finellama, strict primary).
    d = make_run(sw, "seed-v1", ["experiment=smoke", "trainer=grpo", "trainer.max_steps=200"], [0.2], [0.9], 60)
    atomic_write_json(d / "eval_results.json", json.loads(V1_FIXTURE.read_text()))
    return sw


def parse_table(markdown: str, first_header: str = "run"):
    lines = [l for l in markdown.splitlines() if l.startswith("|") and not l.startswith("|-")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    starts = [i for i, row in enumerate(cells) if row[0] == first_header]
    table = cells[starts[0]:]
    end = next((i for i, row in enumerate(table[1:], 1) if row[0] in ("run", "run A")), len(table))
    return [dict(zip(table[0], row)) for row in table[1:end]]


def ci_text(c: int, n: int) -> str:
    lo, hi = wilson_interval(c, n)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def test_report_table_has_accuracy_intervals_and_significance(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = {r["run"]: r for r in parse_table(md)}
    assert list(rows) == ["grpo-tiny-cpu", "grpo-tiny-cpu-lr", "ppo-tiny-a100_80", "seed-v1"]
    a, b, c, d = rows["grpo-tiny-cpu"], rows["ppo-tiny-a100_80"], rows["grpo-tiny-cpu-lr"], rows["seed-v1"]
    assert (a["model"], a["trainer"], a["hardware"], a["steps"], a["protocol"]) == ("tiny", "grpo", "cpu", "4", "qwen_boxed/math_verify")
    assert (a["wall time"], a["GPU-hours"], a["OOM attempts"], a["eval n"]) == ("1:00:00", "0.00", "0", "60")
    assert (a["baseline %"], a["baseline 95% CI"], a["final %"], a["final 95% CI"]) == ("33.3", ci_text(20, 60), "63.3", ci_text(38, 60))
    assert (a["Δ (pp)"], a["p (McNemar)"], a["vs baseline"]) == ("+30.0", "<0.001", "better")
    assert mcnemar_exact(2, 20) < 0.001 and (a["final strict %"], a["final lenient %"]) == ("33.3", "63.3")
    assert (b["final %"], b["Δ (pp)"], b["p (McNemar)"], b["vs baseline"]) == ("38.3", "+5.0", f"{mcnemar_exact(3, 6):.3f}", "not significant")
    assert float(b["GPU-hours"]) == pytest.approx(3900 / 3600 * 2, abs=0.005) and b["OOM attempts"] == "2"
    assert (c["steps"], c["final %"], c["Δ (pp)"], c["vs baseline"], c["baseline %"], c["eval n"]) == ("3", "-", "-", "-", "50.0", "20")
    # schema 1: finellama/strict, 2 of 6; its embedded baseline has no records: Δ without a test
    assert (d["protocol"], d["final %"], d["final 95% CI"], d["baseline %"]) == ("finellama/strict", "33.3", ci_text(2, 6), "16.7")
    assert (d["Δ (pp)"], d["p (McNemar)"], d["vs baseline"]) == ("+16.7", "-", "untested (no records)")
    pairs = {(r["run A"], r["run B"]): r for r in parse_table(md, "run A")}
    ab = pairs[("grpo-tiny-cpu", "ppo-tiny-a100_80")]
    only_a = sum(x and not y for x, y in zip(GRPO_FINAL, PPO_FINAL))
    only_b = sum(y and not x for x, y in zip(GRPO_FINAL, PPO_FINAL))
    assert (ab["common n"], ab["A %"], ab["B %"], ab["Δ B−A (pp)"]) == ("60", "63.3", "38.3", "-25.0")
    assert ab["p (McNemar)"] == ("<0.001" if mcnemar_exact(only_a, only_b) < 0.001 else f"{mcnemar_exact(only_a, only_b):.3f}")
    assert ab["verdict"] == "grpo-tiny-cpu better"
    assert pairs[("grpo-tiny-cpu", "seed-v1")]["verdict"] == "protocols differ"
    printed = capsys.readouterr().out
    assert "| grpo-tiny-cpu " in printed and "report.html" in printed and "Runs compared on the same problems" in printed


def test_accuracy_curves_never_join_protocols_or_splits(sweep, tmp_path):
    """The validation evaluation during training (step 2) is its own curve, apart from the
    test baseline and final; files without a split (older) read as test."""
    rep = sweep_report.write_report(sweep, tmp_path / "out")
    series = sweep_report.accuracy_series(rep.runs)
    assert series["grpo-tiny-cpu (qwen_boxed/math_verify)"] == [
        (0, pytest.approx(100 / 3), pytest.approx(100 * wilson_interval(20, 60)[0]), pytest.approx(100 * wilson_interval(20, 60)[1])),
        (4, pytest.approx(100 * 38 / 60), pytest.approx(100 * wilson_interval(38, 60)[0]), pytest.approx(100 * wilson_interval(38, 60)[1]))]
    assert series["grpo-tiny-cpu (qwen_boxed/math_verify, validation)"] == [
        (2, pytest.approx(100 * 25 / 60), pytest.approx(100 * wilson_interval(25, 60)[0]), pytest.approx(100 * wilson_interval(25, 60)[1]))]
    assert [p[0] for p in series["grpo-tiny-cpu (lm_eval_gsm8k/lm_eval_strict)"]] == [4]
    assert [p[0] for p in series["ppo-tiny-a100_80 (qwen_boxed/math_verify)"]] == [0, 2]
    assert [p[0] for p in series["seed-v1 (finellama/strict)"]] == [0, 200]  # baseline from inside eval_results.json
    assert len(series) == 6


def test_report_pngs_decode_at_the_expected_size(sweep, tmp_path):
    import matplotlib.image as mpimg

    rep = sweep_report.write_report(sweep, tmp_path / "out")
    assert sorted(rep.images) == sorted(sweep_report.PLOTS)
    for name, path in rep.images.items():
        img = mpimg.imread(path)
        assert img.shape[:2] == PNG_SHAPE, name
        assert img[..., :3].std() > 0.05, f"{name}.png looks blank"
        assert f"![{name}]({name}.png)" in rep.markdown.read_text()


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
    rep = sweep_report.write_report(sweep, tmp_path / "out")
    page = rep.html.read_text()
    assert "<table id='runs'>" in page and "<table id='table2'>" in page
    # runs table, pairs table (3 pairs of finished runs), training signals (a row per run); no arms tables:
    # every arm has one seed here (seed-v1 trains 200 steps, grpo-tiny-cpu 8; test_report_seeds.py has arms)
    assert page.count("<tr>") == (1 + 4) + (1 + 3) + (1 + 4)
    assert "Arms across seeds" not in page
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "external resource in report.html"
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "<td class='pos'>+30.0</td>" in page and "<td class='sig-pos'>better</td>" in page
    assert "<td class='ns'>not significant</td>" in page and "<td class='neg'>-25.0</td>" in page


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
    # apt installed it into /usr/bin, which a PATH made before the install may shadow (scripts/run_tests.sh phase 1)
    return shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")


def test_html_screenshot_in_headless_chromium_shows_the_table_and_significance(sweep, tmp_path):
    from PIL import Image

    rep = sweep_report.write_report(sweep, tmp_path / "out")
    shot = tmp_path / "screenshot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1600,900",
           f"file://{rep.html}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1600, 900)
    px = np.asarray(img).astype(int)
    assert px.std() > 20, "the screenshot is blank"
    # The table header is dark blue (#1f3b5c) near the top: the table rendered.
    header = (np.abs(px - np.array([0x1F, 0x3B, 0x5C])).sum(axis=2) < 30)
    rows_hit = np.nonzero(header.any(axis=1))[0]
    assert header.sum() > 2000 and rows_hit.min() < 200, "no table header in the screenshot"
    # Dark text on the (light) body rows just below the header.
    below = px[rows_hit.max() + 2 : rows_hit.max() + 80, :600]
    assert (below.sum(axis=2) < 200).sum() > 200, "no text in the table rows"
    # The significance column: a green "better" cell (#d8f0dd) for the GRPO run, in the runs table.
    green = (np.abs(px - np.array([0xD8, 0xF0, 0xDD])).sum(axis=2) < 12)
    assert green.sum() > 300 and np.nonzero(green.any(axis=1))[0].min() < rows_hit.max() + 120, "no significance cell"
    shutil.copy(shot, rep.html.with_name("screenshot.png"))  # kept next to the report for a human look


def test_a_validation_evaluation_is_never_paired_with_a_test_one():
    from finellama_rl.eval.compare import EvalView, paired, why_not_paired

    val = EvalView.of(eval_doc("grpo-tiny-cpu", 2, GRPO_MID, split="validation"))
    test, older = EvalView.of(eval_doc("grpo-tiny-cpu", 4, GRPO_FINAL, split="test")), EvalView.of(eval_doc("a", 4, BASE))
    assert (val.split, test.split, older.split) == ("validation", "test", "test")
    assert paired(val, test) is None and why_not_paired(val, test) == "splits differ"
    assert paired(older, test) is not None  # same problems, same split: paired as before
