"""finellama_rl.report on a 2 trainers x 3 seeds sweep (issue 21): runs that differ only by
trainer.seed form one arm, shown with its mean across seeds, a hierarchical-bootstrap 95%
interval, min-max and std, and the two arms compared on their pooled problems with the
probability that one beats the other; the same figures from eval/bootstrap.py on the fixture's
records, by hand where they can be; deterministic; shown in report.md and in report.html as
headless Chromium renders it. Then the reward-hacking flag: a run whose reward rises while its
accuracy falls is flagged, one whose accuracy stays flat too, one where both rise is not."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_report import chromium, eval_doc, make_run, parse_table, vector

from finellama_rl import report
from finellama_rl.eval import arms, bootstrap, sweep_report, training_signals
from finellama_rl.eval.statistics import mann_kendall, mcnemar_exact
from finellama_rl.fileio import append_jsonl, atomic_write_json

N = 60
BASE = vector((True, 20), (False, 40))
# Correct answers per seed (of 60): GRPO 30/36/42 (50/60/70%), PPO 27/33/39 (45/55/65%).
CORRECT = {"grpo": (30, 36, 42), "ppo": (27, 33, 39)}
OFFSET = {"grpo": 0, "ppo": 5}  # PPO's right answers start at problem 5: the arms disagree on some problems


def final_vector(algo: str, seed: int):
    start, c = OFFSET[algo], CORRECT[algo][seed]
    return [start <= i < start + c for i in range(N)]


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    sw = tmp_path / "seeds"
    for algo in ("grpo", "ppo"):
        for seed in (0, 1, 2):
            name = f"{algo}-tiny-cpu-seed{seed}"
            run = make_run(sw, name, ["experiment=smoke", f"trainer={algo}", f"trainer.seed={seed}"],
                           [0.1, 0.2, 0.3, 0.4], [1.0, 0.9, 0.8, 0.7], 600)
            base = eval_doc(name, 0, BASE)
            atomic_write_json(run / "eval_baseline.json", base)
            atomic_write_json(run / "eval_results.json", eval_doc(name, 4, final_vector(algo, seed), baseline=base))
    return sw


def rows_after(markdown: str, title: str, first_header: str):
    return parse_table(markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0], first_header)


def test_report_aggregates_seeds_into_arms_with_bootstrap_intervals(seed_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(seed_sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    arm_rows = {r["arm"]: r for r in rows_after(md, sweep_report.ARMS_TITLE, "arm")}
    assert list(arm_rows) == ["trainer.algo=grpo", "trainer.algo=ppo"]  # 6 runs, 2 arms: only the seed differs within
    g, p = arm_rows["trainer.algo=grpo"], arm_rows["trainer.algo=ppo"]
    assert (g["seeds"], g["common n"], g["mean %"], g["min–max %"], g["per seed %"]) == ("3", "60", "60.0", "50.0–70.0", "50.0 60.0 70.0")
    assert (p["mean %"], p["min–max %"], p["std (pp)"], g["std (pp)"]) == ("55.0", "45.0–65.0", "10.0", "10.0")
    assert g["runs"] == "grpo-tiny-cpu-seed0, grpo-tiny-cpu-seed1, grpo-tiny-cpu-seed2"
    grpo = np.array([final_vector("grpo", s) for s in range(3)], dtype=float)
    ppo = np.array([final_vector("ppo", s) for s in range(3)], dtype=float)
    est = bootstrap.estimate_arm(grpo)
    assert g["95% CI (seeds × problems)"] == f"[{100 * est.ci[0]:.1f}, {100 * est.ci[1]:.1f}]"
    assert est.ci[0] < 0.60 < est.ci[1] and est.ci[1] - est.ci[0] > 0.10  # seeds 10 points apart widen it
    # the arms compared on the pooled 60 problems: B - A = PPO - GRPO = -5 points; P(PPO > GRPO) = 3/9 by hand
    pair = rows_after(md, sweep_report.ARM_PAIRS_TITLE, "arm A")[0]
    cmp = bootstrap.compare_arms(grpo, ppo)
    assert (pair["arm A"], pair["arm B"], pair["pooled n"], pair["A %"], pair["B %"]) == (
        "trainer.algo=grpo", "trainer.algo=ppo", "60", "60.0", "55.0")
    assert (pair["Δ B−A (pp)"], pair["P(B > A)"]) == ("-5.0", f"{3 / 9:.2f}")
    assert pair["Δ 95% CI"] == f"[{100 * cmp.delta_ci[0]:.1f}, {100 * cmp.delta_ci[1]:.1f}]"
    assert cmp.delta_ci[0] < -0.05 < cmp.delta_ci[1] and pair["verdict"] == "not significant"
    printed = capsys.readouterr().out
    assert sweep_report.ARMS_TITLE in printed and "| trainer.algo=grpo" in printed
    # deterministic: a second report gives the same tables
    again = sweep_report.write_report(seed_sweep, tmp_path / "again")
    assert [s.rows for s in again.sections] == [s.rows for s in sweep_report.write_report(seed_sweep, out).sections]
    assert "hierarchical bootstrap" in md and "probability of improvement" in md


def test_one_seed_per_arm_shows_no_arms_table(seed_sweep, tmp_path):
    import shutil

    for algo in ("grpo", "ppo"):
        for seed in (1, 2):
            shutil.rmtree(seed_sweep / f"{algo}-tiny-cpu-seed{seed}")
    rep = sweep_report.write_report(seed_sweep, tmp_path / "out")
    assert [s.title for s in rep.sections] == [sweep_report.PAIRS_TITLE, sweep_report.SIGNALS_TITLE]


def test_arm_labels_name_only_the_keys_that_tell_arms_apart():
    idents = [{"trainer.algo": "'grpo'", "trainer.learning_rate": "1e-05", "trainer.lr_schedule": "'constant'"},
              {"trainer.algo": "'grpo'", "trainer.learning_rate": "0.0001", "trainer.lr_schedule": "'constant'"},
              {"trainer.algo": "'ppo'", "trainer.learning_rate": "1e-05", "trainer.lr_schedule": "'linear'"}]
    assert arms.label_keys(idents) == ["trainer.algo", "trainer.learning_rate"]  # lr_schedule only follows algo
    assert arms.label_keys(idents[:1]) == []


def screenshot(html: Path, tmp_path: Path, size=(1600, 2400)) -> np.ndarray:
    """report.html as headless Chromium paints it, tall enough for every table of these sweeps."""
    from PIL import Image

    shot = tmp_path / "screenshot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}",
           f"file://{html}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == size
    return np.asarray(img).astype(int)


def header_bands(px: np.ndarray):
    """(top, bottom) pixel rows of each table's dark-blue (#1f3b5c) header, top to bottom."""
    rows = np.nonzero((np.abs(px - np.array([0x1F, 0x3B, 0x5C])).sum(axis=2) < 30).sum(axis=1) > 100)[0]
    bands, start = [], None
    for i, y in enumerate(rows):
        if start is None:
            start = y
        if i + 1 == len(rows) or rows[i + 1] != y + 1:
            bands.append((start, y))
            start = None
    return bands


def test_arms_tables_in_headless_chromium(seed_sweep, tmp_path):
    """The page shows five tables (runs, runs paired, arms, arms paired, training signals): the
    arms table's header is the third dark-blue band, with rows of text under it."""
    rep = sweep_report.write_report(seed_sweep, tmp_path / "out")
    page = rep.html.read_text()
    assert "<table id='arms'>" in page and "<table id='arm-pairs'>" in page and "trainer.algo=grpo" in page
    px = screenshot(rep.html, tmp_path)
    bands = header_bands(px)
    assert len(bands) >= 5, f"expected 5 table headers in the screenshot, found {bands}"
    arms_bottom = bands[2][1]
    below = px[arms_bottom + 2: arms_bottom + 40, :1200]  # the arms' two rows
    assert (below.sum(axis=2) < 200).sum() > 300, "no text in the arms table's rows"
    shutil.copy(tmp_path / "screenshot.png", rep.html.with_name("screenshot.png"))  # kept for a human look


# ------------------------------------------------------------------ the reward-hacking flag

def make_signal_run(sw: Path, name: str, lr: float, rewards, evals, truncated=None) -> Path:
    """A run with metrics (reward, two reward sources, completion length, optionally the truncated
    fraction) and evaluations {step: correct vector}: step 0 the baseline, the last the final."""
    max_steps = max(len(rewards), *evals)  # readers refuse steps beyond trainer.max_steps (issue 19)
    run = make_run(sw, name, ["experiment=smoke", "trainer=grpo", f"trainer.learning_rate={lr}", f"trainer.max_steps={max_steps}"],
                   [], [], 100)
    for step, r in enumerate(rewards, start=1):
        line = {"step": step, "train/reward_mean": r, "train/reward/correctness": r / 2, "train/reward/format": r,
                "train/completion_len": 10 + step}
        append_jsonl(run / "metrics.jsonl", {**line, **({"train/frac_truncated": truncated(step)} if truncated else {})})
    steps = sorted(evals)
    split = {"split": training_signals.SELECTION_SPLIT}  # the split the flag reads (validation)
    base = {**eval_doc(name, 0, evals[0]), **split}
    atomic_write_json(run / "eval_baseline.json", base)
    for step in steps[1:-1]:
        atomic_write_json(run / "evals" / f"step_{step:06d}.json", {**eval_doc(name, step, evals[step]), **split})
    atomic_write_json(run / "eval_results.json", {**eval_doc(name, steps[-1], evals[steps[-1]], baseline=base), **split})
    return run


RISING = [0.1, 0.15, 0.2, 0.3, 0.32, 0.4, 0.45, 0.5, 0.58, 0.6, 0.7, 0.8]  # 12 steps, rising throughout


@pytest.fixture
def hack_sweep(tmp_path) -> Path:
    sw = tmp_path / "hack"
    # reward rises while accuracy falls: 40/60 at step 6, 30/60 at the end (it broke 10 it had)
    make_signal_run(sw, "hacked", 1e-3, RISING, {0: vector((True, 40), (False, 20)), 6: vector((True, 38), (False, 22)),
                                                 12: vector((True, 30), (False, 30))}, truncated=lambda step: step / 24)
    # reward rises, accuracy barely moves: 30 -> 32 of 60 (McNemar p = 0.5)
    make_signal_run(sw, "flat", 2e-3, RISING, {0: vector((True, 30), (False, 30)), 6: vector((True, 30), (False, 30)),
                                               12: vector((True, 32), (False, 28))})
    # both rise: 25 -> 45 of 60, significant
    make_signal_run(sw, "honest", 3e-3, RISING, {0: vector((True, 20), (False, 40)), 6: vector((True, 25), (False, 35)),
                                                 12: vector((True, 45), (False, 15))})
    return sw


def test_reward_up_accuracy_down_is_flagged_and_both_up_is_not(hack_sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(hack_sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = {r["run"]: r for r in rows_after(md, sweep_report.SIGNALS_TITLE, "run")}
    hacked, flat, honest = rows["hacked"], rows["flat"], rows["honest"]
    assert hacked["flag"] == training_signals.FLAG_DOWN and flat["flag"] == training_signals.FLAG_FLAT
    assert honest["flag"] == training_signals.NO_FLAG
    window = RISING[6:]  # the last half of 12 logged steps: steps 7..12, so the evaluation before it is step 6's
    assert hacked["reward trend p"] == f"{mann_kendall(window).p_increasing:.3f}" and mann_kendall(window).p_increasing < 0.05
    assert (hacked["accuracy % (from → to)"], hacked["steps"], hacked["Δ (pp)"]) == ("63.3 → 50.0", "6 → 12", "-13.3")
    assert hacked["p (McNemar)"] == f"{mcnemar_exact(8, 0):.3f}"
    assert flat["p (McNemar)"] == f"{mcnemar_exact(0, 2):.3f}" and honest["p (McNemar)"] == "<0.001"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert hacked["reward (1st → 2nd half)"] == f"{mean(RISING[:6]):.3f} → {mean(RISING[6:]):.3f}"
    assert hacked["reward/format"] == hacked["reward (1st → 2nd half)"]  # the fixture's format reward is the reward
    assert hacked["reward/correctness"] == f"{mean(RISING[:6]) / 2:.3f} → {mean(RISING[6:]) / 2:.3f}"
    assert hacked["completion len"] == f"{mean(range(11, 17)):.1f} → {mean(range(17, 23)):.1f}"
    assert hacked["truncated %"] == f"{100 * mean([s / 24 for s in range(1, 7)]):.1f} → {100 * mean([s / 24 for s in range(7, 13)]):.1f}"
    assert honest["truncated %"] == "-" and hacked["split"] == training_signals.SELECTION_SPLIT
    assert "Mann–Kendall" in md
    page = (out / "report.html").read_text()
    assert f"<td class='sig-neg'>{training_signals.FLAG_DOWN}</td>" in page


def test_a_flat_reward_is_never_flagged_and_a_short_run_is_unknown(hack_sweep, tmp_path):
    rep = sweep_report.write_report(hack_sweep, tmp_path / "out")
    hacked = next(r for r in rep.runs if r.name == "hacked")
    noisy = [{**m, "train/reward_mean": [0.5, 0.4, 0.6, 0.5, 0.45, 0.55][i % 6]} for i, m in enumerate(hacked.metrics)]
    assert training_signals.training_signals(type(hacked)(**{**hacked.__dict__, "metrics": noisy})).flag == training_signals.NO_FLAG
    short = type(hacked)(**{**hacked.__dict__, "metrics": hacked.metrics[:8]})  # a window of 4 points
    assert training_signals.hacking_flag(short) == training_signals.UNKNOWN
    # the split it reads is a parameter: no evaluations of another split in these runs, nothing to judge there
    assert training_signals.hacking_flag(hacked, split="no-such-split") == training_signals.UNKNOWN


def test_flag_cell_in_headless_chromium(hack_sweep, tmp_path):
    """The raised flag is a red cell (td.sig-neg) in the training-signals table, the third on the page
    (runs, runs paired, signals: three arms of one run each make no arms tables)."""
    rep = sweep_report.write_report(hack_sweep, tmp_path / "out")
    px = screenshot(rep.html, tmp_path)
    bands = header_bands(px)
    assert len(bands) == 3, bands
    red = np.abs(px - np.array([0xF6, 0xD9, 0xD9])).sum(axis=2) < 12
    assert red[bands[2][1]:].sum() > 300, "no red flag cell in the training-signals table"


def test_the_flag_reads_the_split_it_is_given_and_a_missing_split_is_test(hack_sweep, tmp_path):
    """Eval files of another split are their own series, and the flag reads the split it is given
    (SELECTION_SPLIT by default: validation); files without the `split` field count as test."""
    from finellama_rl.eval.compare import split_of

    assert (split_of({}), split_of({"split": "validation"}), split_of({"split": {"name": "validation"}})) == (
        "test", "validation", "validation")
    assert training_signals.SELECTION_SPLIT == "validation"  # never the test split, which is only reported
    other = "test"
    run = hack_sweep / "hacked"
    for step, correct in ((0, 20), (6, 25), (12, 45)):  # on the other split, accuracy rose with the reward
        doc = {**eval_doc("hacked", step, vector((True, correct), (False, N - correct))), "split": other}
        atomic_write_json(run / "evals" / f"other_{step:06d}.json", doc)
    rep = sweep_report.write_report(hack_sweep, tmp_path / "out")
    hacked = next(r for r in rep.runs if r.name == "hacked")
    assert training_signals.hacking_flag(hacked, split=other) == training_signals.NO_FLAG
    assert training_signals.hacking_flag(hacked) == training_signals.FLAG_DOWN  # SELECTION_SPLIT's evaluations
    series = sweep_report.accuracy_series(rep.runs)
    label = lambda split: "hacked (qwen_boxed/math_verify" + ("" if split == "test" else f", {split}") + ")"  # noqa: E731
    assert [p[0] for p in series[label(other)]] == [p[0] for p in series[label(training_signals.SELECTION_SPLIT)]] == [0, 6, 12]
