"""Sweep comparison: one table and a few plots from the run folders of a sweep.

Why: after `launch -m trainer=ppo,grpo ...` the question is "which run did what,
at what cost": steps, wall time, GPU-hours, out-of-memory attempts, and baseline
vs final accuracy under both extraction rules (strict `####` and lenient last
number can differ by tens of points on GSM8K, so we always show both). Everything
comes from files the runs wrote (config.yaml, metrics.jsonl, attempts.jsonl,
training_stats.json, eval_baseline.json, evals/*.json, eval_results.json); a run
still in progress shows what it has so far.

    python -m finellama_rl.report results/<sweep> [--out DIR]

Writes report.md, report.html (self-contained: inline CSS, images as data URIs),
reward.png, loss.png, accuracy.png and attempts.png into DIR (default: the sweep
folder), and prints the table. No torch here.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.monitor import format_duration
from finellama_rl.results import RunPaths, iter_run_dirs, read_json, read_jsonl
from finellama_rl.stats import dedupe_steps

log = logging.getLogger(__name__)

FIG_SIZE_IN = (8.0, 4.5)
FIG_DPI = 100  # PNGs are 800 x 450 pixels
PLOTS = ("reward", "loss", "accuracy", "attempts")
OOM_OUTCOMES = ("oom", "out_of_memory", "outofmemory")
OOM_ERRORS = ("out of memory", "outofmemoryerror")
FAILED_OUTCOMES = {"error", "failed", "failure", "crash", "crashed"}  # attempts.py also writes completed|stopped|crashed_on_purpose
HEADERS = ["run", "model", "trainer", "hardware", "steps", "wall time", "GPU-hours", "OOM attempts", "eval n",
           "baseline strict %", "baseline lenient %", "final strict %", "final lenient %",
           "Δ strict (pp)", "Δ lenient (pp)"]
Acc = Tuple[float, float, int]  # (strict, lenient, n)


# --------------------------------------------------------------- attempts.jsonl

def is_oom_attempt(attempt: Dict[str, Any]) -> bool:
    outcome = str(attempt.get("outcome") or "").lower()
    error = str(attempt.get("error") or "").lower()
    return any(w in outcome for w in OOM_OUTCOMES) or any(w in error for w in OOM_ERRORS)


def attempt_micro_batch(attempt: Dict[str, Any]) -> Optional[int]:
    value = attempt.get("micro_batch") or (attempt.get("setting") or {}).get("micro_batch")
    return int(value) if value else None


def last_ok_micro_batch(attempts: Sequence[Dict[str, Any]]) -> Optional[int]:
    """The micro batch of the last attempt that neither ran out of memory nor failed."""
    for a in reversed(attempts):
        if not is_oom_attempt(a) and str(a.get("outcome") or "").lower() not in FAILED_OUTCOMES:
            mb = attempt_micro_batch(a)
            if mb:
                return mb
    return None


def attempt_wall_s(attempt: Dict[str, Any]) -> float:
    for key in ("wall_time_s", "wall_s", "wall_time", "seconds"):
        if attempt.get(key) is not None:
            return float(attempt[key])
    return 0.0


# ------------------------------------------------------------------ one run

@dataclass
class RunSummary:
    name: str
    model: str
    trainer: str
    hardware: str
    steps: int
    wall_s: Optional[float]
    gpus: int
    oom_attempts: int
    attempts: List[Dict[str, Any]]
    baseline: Optional[Acc]
    final: Optional[Acc]
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    points: List[Tuple[int, float, float, int]] = field(default_factory=list)  # accuracy per checkpoint

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.wall_s is None else self.wall_s / 3600 * self.gpus


def read_run_config(run_dir: Path) -> Dict[str, Any]:
    """config.yaml as plain data (tolerant of older schemas: the report only reads names)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "config.yaml"), resolve=False) or {}
    except Exception as exc:  # a broken config must not hide the other runs
        log.warning("report: cannot read %s/config.yaml (%s)", run_dir, exc)
        return {}


def _read_doc(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
        return doc if isinstance(doc, dict) and "accuracy" in doc else None
    except (OSError, ValueError) as exc:
        log.warning("report: skipping %s (%s)", path, exc)
        return None


def _acc(summary: Optional[Dict[str, Any]]) -> Optional[Acc]:
    if not summary or "accuracy" not in summary:
        return None
    return float(summary["accuracy"]["strict"]), float(summary["accuracy"]["lenient"]), int(summary.get("total") or 0)


def accuracy_points(paths: RunPaths) -> List[Tuple[int, float, float, int]]:
    """(step, strict, lenient, n) per evaluated step; the evaluation with most problems wins a step."""
    best: Dict[int, Tuple[int, str, Tuple[int, float, float, int]]] = {}
    files = [paths.baseline, *sorted((paths.root / "evals").glob("*.json")), paths.eval_results]
    docs = [d for d in map(_read_doc, files) if d is not None and d.get("step") is not None]
    final = _read_doc(paths.eval_results)
    if final and final.get("baseline"):  # the baseline summary embedded in the final eval is step 0
        docs.insert(0, {**final["baseline"], "step": 0, "date": ""})
    for doc in docs:
        step, acc = int(doc["step"]), _acc(doc)
        rank = (acc[2], str(doc.get("date") or ""))
        if step not in best or rank >= best[step][:2]:
            best[step] = (*rank, (step, acc[0], acc[1], acc[2]))
    return [best[s][2] for s in sorted(best)]


def run_wall_s(paths: RunPaths, attempts: List[Dict[str, Any]], metrics: List[Dict[str, Any]]) -> Optional[float]:
    """Wall time: summed over attempts.jsonl if it has times, else training_stats.json, else metrics."""
    total = sum(attempt_wall_s(a) for a in attempts)
    if total > 0:
        return total
    if paths.training_stats.is_file():
        wall = (read_json(paths.training_stats).get("summary") or {}).get("wall_time_s_this_attempt")
        if wall is not None:
            return float(wall)
    elapsed = [m["time/elapsed_s"] for m in metrics if m.get("time/elapsed_s") is not None]
    return float(elapsed[-1]) if elapsed else None


def summarize_run(run_dir: Path) -> RunSummary:
    paths = RunPaths(Path(run_dir))
    cfg = read_run_config(run_dir)
    hw, run = cfg.get("hardware") or {}, cfg.get("run") or {}
    attempts = read_jsonl(paths.attempts)
    metrics = dedupe_steps(read_jsonl(paths.metrics))
    final_doc = _read_doc(paths.eval_results)
    baseline = (final_doc or {}).get("baseline") or _read_doc(paths.baseline)
    steps = int(final_doc["step"]) if final_doc else (int(metrics[-1]["step"]) if metrics else 0)
    return RunSummary(
        name=str(run.get("name") or Path(run_dir).name), model=str((cfg.get("model") or {}).get("name", "?")),
        trainer=str((cfg.get("trainer") or {}).get("algo", "?")), hardware=str(hw.get("name", "?")), steps=steps,
        wall_s=run_wall_s(paths, attempts, metrics), gpus=int(hw.get("gpus_per_node") or 0) if hw.get("device") == "cuda" else 0,
        oom_attempts=sum(is_oom_attempt(a) for a in attempts), attempts=attempts, baseline=_acc(baseline),
        final=_acc(final_doc), metrics=metrics, points=accuracy_points(paths),
    )


# -------------------------------------------------------------------- table

def _pct(acc: Optional[Acc], i: int) -> str:
    return "-" if acc is None else f"{100 * acc[i]:.1f}"


def _delta(r: RunSummary, i: int) -> str:
    if r.final is None or r.baseline is None:
        return "-"
    if r.final[2] != r.baseline[2]:
        return "n/a"  # different numbers of problems: not comparable
    return f"{100 * (r.final[i] - r.baseline[i]):+.1f}"


def table_rows(runs: Sequence[RunSummary]) -> List[List[str]]:
    rows = []
    for r in runs:
        n = r.final[2] if r.final else (r.baseline[2] if r.baseline else None)
        rows.append([r.name, r.model, r.trainer, r.hardware, str(r.steps),
                     "-" if r.wall_s is None else format_duration(r.wall_s),
                     "-" if r.gpu_hours is None else f"{r.gpu_hours:.2f}", str(r.oom_attempts),
                     "-" if n is None else str(n), _pct(r.baseline, 0), _pct(r.baseline, 1),
                     _pct(r.final, 0), _pct(r.final, 1), _delta(r, 0), _delta(r, 1)])
    return rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table with aligned columns (readable in a terminal and as markdown)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


NOTES = [
    "Accuracy: share of test problems answered correctly, greedy decoding. strict: the number after the last "
    "`####`; lenient: the last number in the completion.",
    "Δ = final − baseline in percentage points; n/a when the two evaluations used different numbers of problems.",
    "Wall time: summed over attempts.jsonl when present, else the last attempt (training_stats.json). "
    "GPU-hours = wall time × GPUs (0 on CPU).",
    "OOM attempts: attempts in attempts.jsonl that ran out of memory (0 when the file is absent).",
]


# -------------------------------------------------------------------- plots

def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    return fig, ax


def _save(fig, ax, path: Path, has_data: bool) -> Path:
    import matplotlib.pyplot as plt

    if has_data:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)  # no bbox_inches="tight": the size stays FIG_SIZE_IN * FIG_DPI
    plt.close(fig)
    return path


def plot_metric(runs: Sequence[RunSummary], key: str, ylabel: str, path: Path) -> Path:
    fig, ax = _figure(f"{ylabel} per step", "step", ylabel)
    has_data = False
    for r in runs:
        pts = [(m["step"], m[key]) for m in r.metrics if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=r.name)
            has_data = True
    return _save(fig, ax, path, has_data)


def plot_accuracy(runs: Sequence[RunSummary], path: Path) -> Path:
    fig, ax = _figure("Accuracy per checkpoint (solid: strict, dashed: lenient)", "step", "accuracy (%)")
    has_data = False
    for r in runs:
        if not r.points:
            continue
        steps = [p[0] for p in r.points]
        line, = ax.plot(steps, [100 * p[1] for p in r.points], marker="o", label=f"{r.name} strict")
        ax.plot(steps, [100 * p[2] for p in r.points], marker="x", ls="--", color=line.get_color(), label=f"{r.name} lenient")
        has_data = True
    return _save(fig, ax, path, has_data)


def plot_attempts(runs: Sequence[RunSummary], path: Path) -> Path:
    fig, ax = _figure("Attempts per run (attempts.jsonl)", "", "attempts")
    names = [r.name if r.attempts else f"{r.name}\n(no attempts.jsonl)" for r in runs]
    ooms = [r.oom_attempts for r in runs]
    others = [len(r.attempts) - r.oom_attempts for r in runs]
    ax.bar(names, others, color="tab:green", label="other outcomes (completed, stopped, ...)")
    ax.bar(names, ooms, bottom=others, color="tab:red", label="out of memory")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.yaxis.get_major_locator().set_params(integer=True)
    return _save(fig, ax, path, any(r.attempts for r in runs))


# ------------------------------------------------------------------- report

@dataclass
class Report:
    table: str
    markdown: Path
    html: Path
    images: Dict[str, Path]
    runs: List[RunSummary]


def write_plots(runs: Sequence[RunSummary], out: Path) -> Dict[str, Path]:
    return {
        "reward": plot_metric(runs, "train/reward_mean", "reward (mean)", out / "reward.png"),
        "loss": plot_metric(runs, "train/loss", "loss", out / "loss.png"),
        "accuracy": plot_accuracy(runs, out / "accuracy.png"),
        "attempts": plot_attempts(runs, out / "attempts.png"),
    }


def markdown_report(title: str, subtitle: str, table: str, images: Dict[str, Path], out: Path) -> str:
    parts = [f"# {title}", "", subtitle, "", table, "", *[f"- {n}" for n in NOTES], ""]
    for name, path in images.items():
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        parts += [f"## {name.capitalize()}", "", f"![{name}]({rel})", ""]
    return "\n".join(parts)


def write_report(sweep_dir: Path, out: Optional[Path] = None) -> Report:
    """Table, plots, report.md and report.html for every run folder in `sweep_dir`."""
    from finellama_rl.report_html import build_html
    from finellama_rl.results import atomic_write_text

    sweep_dir = Path(sweep_dir)
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [summarize_run(d) for d in iter_run_dirs(sweep_dir)]
    rows = table_rows(runs)
    table = markdown_table(HEADERS, rows)
    images = write_plots(runs, out)
    title = f"Sweep report: {sweep_dir.resolve().name}"
    subtitle = f"{sweep_dir.resolve()} · {len(runs)} run(s) · generated {_dt.datetime.now().isoformat(timespec='seconds')}"
    md, html = out / "report.md", out / "report.html"
    atomic_write_text(md, markdown_report(title, subtitle, table, images, out))
    atomic_write_text(html, build_html(title, subtitle, HEADERS, rows, NOTES, images))
    return Report(table, md, html, images, runs)


def main(argv: List[str]) -> int:
    from finellama_rl.compose import UsageError

    parser = argparse.ArgumentParser(prog="python -m finellama_rl.report", description="Compare the runs of a sweep.")
    parser.add_argument("sweep", help="the sweep folder, e.g. results/<sweep>")
    parser.add_argument("--out", help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)  # bad usage: argparse prints one line and exits 2
    sweep = Path(args.sweep)
    if not sweep.is_dir():
        raise UsageError(f"sweep: {sweep} is not a folder; pass results/<sweep>")
    if not any(iter_run_dirs(sweep)):
        raise UsageError(f"sweep: no run folders (with config.yaml) in {sweep}; pass results/<sweep>, not a run or results/")
    report = write_report(sweep, Path(args.out) if args.out else None)
    print(report.table)
    print(f"\nreport: {report.markdown}\n        {report.html}", flush=True)
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
