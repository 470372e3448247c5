"""The sweep report (`python -m finellama_rl.report`): one table and a few plots from the run
folders of a sweep.

Why: after `launch -m trainer=ppo,grpo ...` the question is "which run did what,
at what cost, and is the difference real": steps, wall time, GPU-hours,
out-of-memory attempts, baseline and final accuracy under the run's evaluation
protocol with 95% Wilson intervals, the exact McNemar test of final against
baseline on the same problems, the same test between runs (a second table), and
strict/lenient variants for comparison with older runs. Evaluations under
different protocols are never compared and never joined by one curve. Everything
comes from files the runs wrote (config.yaml, metrics.jsonl, attempts.jsonl,
training_stats.json, eval_baseline.json, evals/*.json, eval_results.json; eval
files of schema 1 and 2); a run still in progress shows what it has so far.

    python -m finellama_rl.report results/<sweep> [--out DIR]

Writes report.md, report.html (self-contained: inline CSS, images as data URIs),
reward.png, loss.png, accuracy.png and attempts.png into DIR (default: the sweep
folder), and prints the table. No torch here.
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.eval import schema as eval_schema
from finellama_rl.eval.compare import EvalView, paired, why_not_paired
from finellama_rl.eval.statistics import format_interval, format_p
from finellama_rl.console import format_duration
from finellama_rl.results import RunPaths, iter_run_dirs
from finellama_rl.fileio import atomic_output, number_or_none, read_json_object, read_run_config_data, warn
from finellama_rl.errors import RunConfigUnreadable
from finellama_rl.ladder.attempts import read_attempts
from finellama_rl.stats import MetricLimits, dedupe_steps, read_metrics

log = logging.getLogger(__name__)

FIG_SIZE_IN = (8.0, 4.5)
FIG_DPI = 100  # PNGs are 800 x 450 pixels
PLOTS = ("reward", "loss", "accuracy", "attempts")
OOM_OUTCOMES = ("oom", "out_of_memory", "outofmemory")
OOM_ERRORS = ("out of memory", "outofmemoryerror")
HEADERS = ["run", "model", "trainer", "hardware", "steps", "wall time", "GPU-hours", "OOM attempts", "protocol",
           "eval n", "baseline %", "baseline 95% CI", "final %", "final 95% CI", "Δ (pp)", "p (McNemar)",
           "vs baseline", "final strict %", "final lenient %"]
PAIR_HEADERS = ["run A", "run B", "protocol", "common n", "A %", "B %", "Δ B−A (pp)", "p (McNemar)", "verdict"]
PAIRS_TITLE = "Runs compared on the same problems"
ARMS_TITLE = "Arms across seeds (runs that differ only by trainer.seed)"
ARM_PAIRS_TITLE = "Arms compared on their pooled problems"
SIGNALS_TITLE = "Training signals beside accuracy (reward hacking)"


@dataclass
class Section:
    """One table of the report after the runs table (markdown and HTML show the same)."""

    title: str
    headers: List[str]
    rows: List[List[str]]
    notes: List[str]
    empty: str  # shown instead of an empty table
    anchor: str = ""  # the HTML table's id: report.html#<anchor>


# --------------------------------------------------------------- attempts.jsonl

def is_oom_attempt(attempt: Dict[str, Any]) -> bool:
    outcome = str(attempt.get("outcome") or "").lower()
    error = str(attempt.get("error") or "").lower()
    return any(w in outcome for w in OOM_OUTCOMES) or any(w in error for w in OOM_ERRORS)


def attempt_wall_s(attempt: Dict[str, Any]) -> float:
    for key in ("wall_time_s", "wall_s", "wall_time", "seconds"):
        value = number_or_none(attempt.get(key))
        if value is not None and value >= 0:
            return value
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
    baseline: Optional[EvalView]
    final: Optional[EvalView]
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    points: List[EvalView] = field(default_factory=list)  # one per (protocol, scorer, split, step), by step
    config: Dict[str, Any] = field(default_factory=dict)  # config.yaml as plain data (arms: eval/arms.py)

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.wall_s is None else self.wall_s / 3600 * self.gpus


def read_run_config(run_dir: Path) -> Dict[str, Any]:
    """config.yaml as plain data, never resolving `${...}` (tolerant of older schemas:
    the report only reads names)."""
    try:
        return read_run_config_data(RunPaths(Path(run_dir)).config, escape=False)
    except RunConfigUnreadable as exc:  # a broken config must not hide the other runs
        warn(f"report: {exc}; its names are not shown")
        return {}


def _read_doc(path: Path, max_step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """An eval file under the readers' rules (eval/schema.py: the same check as status and index)."""
    return eval_schema.read_eval_document(path, max_step)


def _view(doc: Optional[Dict[str, Any]]) -> Optional[EvalView]:
    """The evaluation's primary accuracy and per-problem verdicts (a checked document)."""
    return EvalView.of(doc) if isinstance(doc, dict) else None


def accuracy_points(baseline: Optional[Dict[str, Any]], during: Sequence[Dict[str, Any]],
                    final: Optional[Dict[str, Any]]) -> List[EvalView]:
    """The evaluations of a run (checked documents: eval_baseline.json, evals/*.json,
    eval_results.json), one per (protocol, scorer, split, step): the one with most problems
    (then the latest) wins; sorted by protocol, split, then step."""
    best: Dict[Tuple[str, str, str, int], Tuple[int, str, EvalView]] = {}
    docs = [d for d in (baseline, *during, final) if d is not None and d.get("step") is not None]
    if final and isinstance(final.get("baseline"), dict):  # the baseline summary embedded in the final eval is step 0
        docs.insert(0, {**final["baseline"], "step": 0, "date": ""})
    for doc in docs:
        view = _view(doc)
        if view is None or view.step is None:
            continue
        rank = (view.n, str(doc.get("date") or ""))
        key = (*view.key, view.split, view.step)
        if key not in best or rank >= best[key][:2]:
            best[key] = (*rank, view)
    return [best[k][2] for k in sorted(best)]


def run_wall_s(paths: RunPaths, attempts: List[Dict[str, Any]], metrics: List[Dict[str, Any]]) -> Optional[float]:
    """Wall time: summed over attempts.jsonl if it has times, else training_stats.json, else metrics."""
    total = sum(attempt_wall_s(a) for a in attempts)
    if total > 0:
        return total
    stats = read_json_object(paths.training_stats, "its wall time")
    if stats is not None and isinstance(stats.get("summary"), dict):
        wall = number_or_none(stats["summary"].get("wall_time_s_this_attempt"))
        if wall is not None and wall >= 0:
            return wall
    elapsed = [v for m in metrics if (v := number_or_none(m.get("time/elapsed_s"))) is not None and v >= 0]
    return elapsed[-1] if elapsed else None


def _section(cfg: Dict[str, Any], key: str) -> Dict[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def summarize_run(run_dir: Path) -> RunSummary:
    paths = RunPaths(Path(run_dir))
    cfg = read_run_config(run_dir)
    hw, run = _section(cfg, "hardware"), _section(cfg, "run")
    limits = MetricLimits.of_config_data(cfg)
    attempts = read_attempts(paths)
    metrics = dedupe_steps(read_metrics(paths, limits))
    final_doc = _read_doc(paths.eval_results, limits.max_steps)
    baseline_doc = _read_doc(paths.baseline, limits.max_steps)
    during = [d for f in (sorted(paths.evals.glob("*.json")) if paths.evals.is_dir() else [])
              if (d := _read_doc(f, limits.max_steps)) is not None]
    # eval_baseline.json has the per-problem records a paired test needs; the copy inside eval_results.json has not
    baseline = baseline_doc or (final_doc or {}).get("baseline")
    final_step = (final_doc or {}).get("step")
    steps = final_step if isinstance(final_step, int) else (metrics[-1]["step"] if metrics else 0)
    gpus = hw.get("gpus_per_node") if isinstance(hw.get("gpus_per_node"), int) and hw["gpus_per_node"] > 0 else 0
    return RunSummary(
        name=str(run.get("name") or Path(run_dir).name), model=str(_section(cfg, "model").get("name", "?")),
        trainer=str(_section(cfg, "trainer").get("algo", "?")), hardware=str(hw.get("name", "?")), steps=steps,
        wall_s=run_wall_s(paths, attempts, metrics), gpus=gpus if hw.get("device") == "cuda" else 0,
        oom_attempts=sum(is_oom_attempt(a) for a in attempts), attempts=attempts,
        baseline=_view(baseline), final=_view(final_doc), metrics=metrics, config=cfg,
        points=accuracy_points(baseline_doc, during, final_doc),
    )


# -------------------------------------------------------------------- table

def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _vs_baseline(r: RunSummary) -> Tuple[str, str, str]:
    """(Δ pp, p, verdict) of final against baseline: paired on the same problems when the
    records allow, else Δ alone when the evaluations match in protocol and size."""
    b, f = r.baseline, r.final
    if b is None or f is None:
        return "-", "-", "-"
    if b.key != f.key or b.split != f.split:
        return "n/a", "-", why_not_paired(b, f)
    cmp = paired(b, f)
    if cmp is not None:
        verdict = {"B better": "better", "A better": "worse"}.get(cmp.verdict, cmp.verdict)
        return f"{100 * cmp.delta:+.1f}", format_p(cmp.p_value), verdict if cmp.n == f.n == b.n else f"{verdict} (n={cmp.n})"
    if b.n != f.n:
        return "n/a", "-", "different problems"
    return f"{100 * (f.accuracy - b.accuracy):+.1f}", "-", "untested (no records)"


def table_rows(runs: Sequence[RunSummary]) -> List[List[str]]:
    rows = []
    for r in runs:
        shown = r.final or r.baseline
        delta, p, verdict = _vs_baseline(r)
        rows.append([r.name, r.model, r.trainer, r.hardware, str(r.steps),
                     "-" if r.wall_s is None else format_duration(r.wall_s),
                     "-" if r.gpu_hours is None else f"{r.gpu_hours:.2f}", str(r.oom_attempts),
                     "-" if shown is None else f"{shown.protocol}/{shown.scorer}", "-" if shown is None else str(shown.n),
                     _pct(r.baseline and r.baseline.accuracy), format_interval(r.baseline and r.baseline.ci),
                     _pct(r.final and r.final.accuracy), format_interval(r.final and r.final.ci), delta, p, verdict,
                     _pct(r.final and r.final.strict), _pct(r.final and r.final.lenient)])
    return rows


def pair_rows(runs: Sequence[RunSummary]) -> List[List[str]]:
    """Every two runs with a final evaluation: exact McNemar on their common problems."""
    rows = []
    finished = [r for r in runs if r.final is not None]
    for i, a in enumerate(finished):
        for b in finished[i + 1:]:
            cmp = paired(a.final, b.final)
            if cmp is None:
                rows.append([a.name, b.name, a.final.protocol if a.final.key == b.final.key else "differ", "-", _pct(a.final.accuracy),
                             _pct(b.final.accuracy), "-", "-", why_not_paired(a.final, b.final)])
                continue
            verdict = {"B better": f"{b.name} better", "A better": f"{a.name} better"}.get(cmp.verdict, cmp.verdict)
            rows.append([a.name, b.name, f"{a.final.protocol}/{a.final.scorer}", str(cmp.n), _pct(cmp.accuracy_a),
                         _pct(cmp.accuracy_b), f"{100 * cmp.delta:+.1f}", format_p(cmp.p_value), verdict])
    return rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table with aligned columns (readable in a terminal and as markdown)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


NOTES = [
    "Accuracy: share of test problems answered correctly (greedy) under the run's protocol and its primary scorer "
    "(protocol column: qwen_boxed/math_verify, lm_eval_gsm8k/lm_eval_strict, finellama/strict; README 'Evaluation "
    "protocols'). 95% CI: Wilson score interval. strict/lenient: the number after the last `####` / the last number.",
    "Δ = final − baseline in percentage points on the same problems; p: two-sided exact McNemar test on the problems "
    "where the two disagree; 'not significant' when p ≥ 0.05. Evaluations under different protocols are not compared.",
    "Baseline and final are on the test split (only reported); evaluations during training (accuracy.png's "
    "'validation' curves) are on the validation split, which every selection reads.",
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
    try:  # a temp file renamed into place: a full disk leaves the previous PNG, never a truncated one
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=FIG_DPI, format="png")  # no bbox_inches="tight": the size stays FIG_SIZE_IN * FIG_DPI
    finally:
        plt.close(fig)
    return path


def plot_metric(runs: Sequence[RunSummary], key: str, ylabel: str, path: Path) -> Path:
    fig, ax = _figure(f"{ylabel} per step", "step", ylabel)
    has_data = False
    for r in runs:
        pts = [(m["step"], v) for m in r.metrics if (v := number_or_none(m.get(key))) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=r.name)
            has_data = True
    return _save(fig, ax, path, has_data)


def accuracy_series(runs: Sequence[RunSummary]) -> Dict[str, List[Tuple[int, float, float, float]]]:
    """{"<run> (<protocol>/<scorer>[, <split> unless test])": [(step, %, % low, % high)]}: one series per run,
    protocol and split, so no curve joins evaluations of different protocols, nor the
    validation evaluations during training with the test baseline and final."""
    series: Dict[str, List[Tuple[int, float, float, float]]] = {}
    for r in runs:
        for v in r.points:
            lo, hi = v.ci or (v.accuracy, v.accuracy)
            split = "" if v.split == "test" else f", {v.split}"
            series.setdefault(f"{r.name} ({v.protocol}/{v.scorer}{split})", []).append((v.step, 100 * v.accuracy, 100 * lo, 100 * hi))
    return series


def plot_accuracy(runs: Sequence[RunSummary], path: Path) -> Path:
    fig, ax = _figure("Accuracy per checkpoint, 95% Wilson intervals (one curve per run, protocol and split)", "step",
                      "accuracy (%)")
    series = accuracy_series(runs)
    for label, pts in series.items():
        steps, ys, lo, hi = zip(*pts)
        ax.errorbar(steps, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]], marker="o",
                    capsize=3, label=label)
    return _save(fig, ax, path, bool(series))


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
    sections: List[Section] = field(default_factory=list)  # the tables after the runs table


def write_plots(runs: Sequence[RunSummary], out: Path) -> Dict[str, Path]:
    return {
        "reward": plot_metric(runs, "train/reward_mean", "reward (mean)", out / "reward.png"),
        "loss": plot_metric(runs, "train/loss", "loss", out / "loss.png"),
        "accuracy": plot_accuracy(runs, out / "accuracy.png"),
        "attempts": plot_attempts(runs, out / "attempts.png"),
    }


def report_sections(runs: Sequence[RunSummary]) -> List[Section]:
    """The tables after the runs table: runs paired, arms across seeds (when an arm has several
    seeds: eval/arms.py), arms paired, and the training signals with the reward-hacking flag."""
    from finellama_rl.eval import arms as arm_tables
    from finellama_rl.eval import training_signals as signals

    sections = [Section(PAIRS_TITLE, PAIR_HEADERS, pair_rows(runs), [], "(fewer than two finished runs)", "table2")]
    arms = arm_tables.group_arms(runs)
    if any(len(a.runs) > 1 for a in arms):
        sections += [Section(ARMS_TITLE, arm_tables.ARM_HEADERS, arm_tables.arm_rows(arms), [], "", "arms"),
                     Section(ARM_PAIRS_TITLE, arm_tables.ARM_PAIR_HEADERS, arm_tables.arm_pair_rows(arms),
                             arm_tables.ARM_NOTES, "(one arm)", "arm-pairs")]
    sections.append(Section(SIGNALS_TITLE, signals.signal_headers(runs), signals.signal_rows(runs), [signals.RULE], "",
                            "signals"))
    return sections


def markdown_report(title: str, subtitle: str, table: str, sections: Sequence[Section], images: Dict[str, Path],
                    out: Path) -> str:
    parts = [f"# {title}", "", subtitle, "", table, "", *[f"- {n}" for n in NOTES], ""]
    for sec in sections:
        body = markdown_table(sec.headers, sec.rows) if sec.rows else sec.empty
        parts += [f"## {sec.title}", "", body, "", *[f"- {n}" for n in sec.notes], ""]
    for name, path in images.items():
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        parts += [f"## {name.capitalize()}", "", f"![{name}]({rel})", ""]
    return "\n".join(parts)


def write_report(sweep_dir: Path, out: Optional[Path] = None) -> Report:
    """Tables, plots, report.md and report.html for every run folder in `sweep_dir`."""
    from finellama_rl.eval.report_html import build_html
    from finellama_rl.fileio import atomic_write_text

    sweep_dir = Path(sweep_dir)
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [summarize_run(d) for d in iter_run_dirs(sweep_dir)]
    rows, sections = table_rows(runs), report_sections(runs)
    table = markdown_table(HEADERS, rows)
    images = write_plots(runs, out)
    title = f"Sweep report: {sweep_dir.resolve().name}"
    subtitle = f"{sweep_dir.resolve()} · {len(runs)} run(s) · generated {_dt.datetime.now().isoformat(timespec='seconds')}"
    md, html = out / "report.md", out / "report.html"
    atomic_write_text(md, markdown_report(title, subtitle, table, sections, images, out))
    notes = [*NOTES, *[n for sec in sections for n in sec.notes]]
    atomic_write_text(html, build_html(title, subtitle, HEADERS, rows, notes, images,
                                       [(sec.title, sec.headers, sec.rows) for sec in sections],
                                       [sec.anchor for sec in sections]))
    return Report(table, md, html, images, runs, sections)
