"""Every file a run folder holds, damaged, through status, report, index, evaluate and resume.

One finished run (8 steps, checkpoints at 4 and 8, evaluations at 0, 4 and 8, the index,
the ledger) is built by hand in the real formats; each case damages one file (a folder in
its place, not UTF-8, truncated, wrong JSON types, out-of-range values, a planted pickle)
and runs the readers in this process:

- no command ends in a traceback; status, report and index answer (exit 0), evaluate and a
  resumed run either refuse with exit 2 and one line naming the file, or reach the point
  where they would load the model (a stub stops them there: nothing loads);
- no number outside its range is shown or indexed (readers' rules: README "What a run
  writes"): accuracies in [0, 1], steps in [0, max_steps], counts >= 0, n >= 1, rewards
  within what the run's reward sources give, intervals within [0, 1];
- index, status and report show the same final accuracy (or all none of it);
- the damaged file is named by one line (not one per value) in each reader that reads it.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

import pytest

from finellama_rl import evaluate, index, status, train
from finellama_rl.errors import FinellamaError, exit_code
from finellama_rl.fileio import append_jsonl, atomic_write_json, atomic_write_text, forget_warnings

MAX_STEPS = 8
REWARD_RANGE = (0.0, 2.0)  # correctness + format, each in [0, 1]
N = 16
SWEEP, RUN = "sw", "grpo-tiny-cpu"
OVERRIDES = ["experiment=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.save_every=4", "trainer.eval_every=4"]


class ReachedLoading(Exception):
    """Raised by the stub that replaces model loading: the command got past every check."""


# ------------------------------------------------------------------ the finished run, in the real formats


def eval_doc(step: int, correct: int, **extra) -> dict:
    from finellama_rl.eval.statistics import wilson_interval

    records = [{"index": i, "question": f"q{i}", "reference": str(i), "completion": f"#### {i}",
                "correct": {"math_verify": i < correct, "strict": i < correct, "lenient": i < correct}} for i in range(N)]
    acc = correct / N
    return {"schema_version": 2, "run": RUN, "sweep": SWEEP, "model": "tiny", "trainer": "grpo", "hardware": "cpu",
            "data": "arithmetic", "step": step, "date": f"2026-12-07T00:00:{step:02d}", "primary": "math_verify",
            "protocol": {"name": "qwen_boxed", "primary": "math_verify", "shots": 0, "num_examples": str(N)},
            "accuracy": {"math_verify": acc, "strict": acc, "lenient": acc}, "total": N,
            "correct": {"math_verify": correct, "strict": correct, "lenient": correct},
            "ci95": {s: list(wilson_interval(correct, N)) for s in ("math_verify", "strict", "lenient")},
            "pass_at_k": None, **extra, "records": records}


def write_checkpoint(run: Path, step: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from finellama_rl.checkpoint import commit_checkpoint, staging_root

    root = run / "checkpoints"
    staged = staging_root(root) / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((8, 64), float(step))},
              str(staged / "adapter_model.safetensors"))
    atomic_write_json(staged / "adapter_config.json", {"peft_type": "LORA", "r": 8, "lora_alpha": 16})
    torch.save({"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
               staged / "optimizer.pt")
    torch.save({"last_epoch": step}, staged / "scheduler.pt")
    torch.save({"python": [1, 2], "numpy": np.random.default_rng(step).integers(0, 9, 4), "cpu": torch.get_rng_state()},
               staged / "rng_state.pth")  # numpy arrays, as the HF Trainer's RNG file holds
    atomic_write_json(staged / "trainer_state.json", {"global_step": step})
    commit_checkpoint(root, staged, step, {"data_position": step * 4, "rank_weight_digests": ["ab"]}, keep_last=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The results root of one finished run: config, metrics, attempts, stats, evaluations,
    best_checkpoint.json, logs, checkpoints, the sweep's ledger and the results index."""
    from finellama_rl.compose import config_yaml, load_config
    from finellama_rl.eval.results_index import rebuild
    from finellama_rl.results import RunPaths
    from finellama_rl.stats import write_training_stats

    root = tmp_path_factory.mktemp("results")
    run = root / SWEEP / RUN
    cfg = load_config([*OVERRIDES, f"run.results_dir={root}", f"run.sweep={SWEEP}", f"run.name={RUN}"])
    paths = RunPaths(run).make()
    atomic_write_text(paths.config, config_yaml(cfg))
    for step in range(1, MAX_STEPS + 1):
        append_jsonl(paths.metrics, {"step": step, "train/reward_mean": step / 8, "train/loss": 0.5 - step / 32,
                                     "perf/sec_per_step": 0.5, "time/elapsed_s": step * 0.5})
    append_jsonl(paths.attempts, {"attempt": 1, "rung": 0, "micro_batch": 4, "grad_accum": 8, "outcome": "completed",
                                  "steps_done": MAX_STEPS, "wall_time_s": 12.5})
    write_training_stats(paths, cfg, 12.5)
    base = eval_doc(0, 4)
    atomic_write_json(paths.baseline, base)
    atomic_write_json(paths.eval_at_step(4), eval_doc(4, 6))
    atomic_write_json(paths.eval_results, eval_doc(MAX_STEPS, 9, baseline={k: v for k, v in base.items() if k != "records"}))
    atomic_write_json(paths.best_checkpoint, {"metric": "accuracy", "mode": "max", "step": 8, "value": 0.5625,
                                              "checkpoint": None, "restored": False, "history": [{"step": 4, "value": 0.375}]})
    atomic_write_json(paths.current_attempt, {"rung": 0, "step0": 0, "started": 1.0, "job_id": "11", "closed": True})
    for event in ("start", "requeue", "start"):
        append_jsonl(paths.job_events, {"event": event, "restarts": 0})
    append_jsonl(root / SWEEP / "ledger.jsonl", {"kind": "train", "run": RUN, "run_dir": str(run), "job_id": "11"})
    append_jsonl(root / SWEEP / "ledger.jsonl", {"kind": "watchdog", "run": RUN, "run_dir": str(run), "job_id": "12", "watches": "11"})
    for step in (4, MAX_STEPS):
        write_checkpoint(run, step)
    rebuild(root)
    return root


# ------------------------------------------------------------------ damage


def folder(p: Path) -> None:
    """A folder (with a file in it) where the file was."""
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
    p.mkdir(parents=True)
    (p / "stray.txt").write_text("x")


def a_file(p: Path) -> None:
    """A file where the folder was."""
    shutil.rmtree(p)
    p.write_text("not a folder\n")


def not_utf8(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + b"\xff\xfe\x80" + data[len(data) // 2:])


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def write(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(text.encode() if isinstance(text, str) else text)


def append(line: str) -> Callable[[Path], None]:
    def _do(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(line.encode() if isinstance(line, str) else line)
    return _do


def edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change a JSON document (NaN and Infinity written as Python writes them)."""
    def _do(p: Path) -> None:
        doc = json.loads(p.read_text())
        fn(doc)
        p.write_text(json.dumps(doc))
    return _do


def setitem(*keys, value):
    def _fn(doc):
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value
    return _fn


def config_line(old: str, new: str) -> Callable[[Path], None]:
    def _do(p: Path) -> None:
        text = p.read_text()
        assert old in text, old
        p.write_text(text.replace(old, new, 1))
    return _do


def damaged_before_commit(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage a checkpoint file and record it in the manifest (the save itself wrote it so):
    only the file's own structure can tell."""
    def _do(p: Path) -> None:
        from finellama_rl.checkpoint import STATE_FILE, manifest

        damage(p)
        ckpt = next(q for q in p.parents if q.name.startswith("step_"))
        state = json.loads((ckpt / STATE_FILE).read_text())
        state["manifest"] = manifest(ckpt)
        (ckpt / STATE_FILE).write_text(json.dumps(state))
    return _do


def planted_pickle(p: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            import os

            return os.system, ("echo planted",)

    torch.save({"python": Payload()}, p)


# ------------------------------------------------------------------ the table

CKPT = f"checkpoints/step_{MAX_STEPS:06d}"
READERS = frozenset({"status", "report", "index"})


@dataclass(frozen=True)
class Case:
    """`target` relative to the run folder (`@root/` the results folder, `@sweep/` the sweep);
    `named_by`: the commands that must name the file in exactly one line; `refused_by`: the
    commands that must stop with exit 2 and one error line naming it (the others answer or
    reach model loading); `maybe_refused_by`: either (issue 19's part A decides)."""

    id: str
    target: str
    damage: Callable[[Path], None]
    named_by: FrozenSet[str] = READERS
    refused_by: FrozenSet[str] = frozenset()
    maybe_refused_by: FrozenSet[str] = frozenset()
    commands: FrozenSet[str] = READERS


EV, RES = frozenset({"evaluate"}), frozenset({"resume"})
ALL = READERS | EV | RES
CONFIG = dict(named_by=READERS | EV, refused_by=EV, maybe_refused_by=RES, commands=ALL)
METRICS = dict(named_by=frozenset({"status", "report"}), commands=READERS | RES)
EVAL_FINAL = dict(commands=READERS)
CHECKPOINT = dict(named_by=EV, refused_by=EV, commands=EV | RES | frozenset({"status"}))

CASES = [
    # config.yaml: the run's settings (status reads max_steps and the reward range, report the names)
    Case("config-folder", "config.yaml", folder, **CONFIG),
    Case("config-not-utf8", "config.yaml", not_utf8, **CONFIG),
    Case("config-truncated-yaml", "config.yaml", write("trainer: {max_steps: 8\n  algo: [grpo\n"), **CONFIG),
    Case("config-a-list", "config.yaml", write("- trainer\n- model\n"), **CONFIG),
    Case("config-max-steps-string", "config.yaml", config_line(f"max_steps: {MAX_STEPS}", "max_steps: eight"),
         named_by=EV, refused_by=EV, maybe_refused_by=RES, commands=ALL),
    Case("config-max-steps-negative", "config.yaml", config_line(f"max_steps: {MAX_STEPS}", "max_steps: -8"),
         named_by=EV, refused_by=EV, maybe_refused_by=RES, commands=ALL),
    Case("config-empty", "config.yaml", write(""), named_by=EV, refused_by=EV, maybe_refused_by=RES, commands=ALL),
    # metrics.jsonl
    Case("metrics-folder", "metrics.jsonl", folder, named_by=READERS - {"index"} | RES, refused_by=RES, commands=READERS | RES),
    Case("metrics-not-utf8-line", "metrics.jsonl", append(b'\xff\xfe{"step": 9}\n'), **METRICS),
    Case("metrics-torn-last-line", "metrics.jsonl", append('{"step": 9, "train/rew'), named_by=frozenset(), commands=READERS | RES),
    Case("metrics-step-string", "metrics.jsonl", append('{"step": "9", "train/reward_mean": 0.5}\n'), **METRICS),
    Case("metrics-step-negative", "metrics.jsonl", append('{"step": -3, "train/reward_mean": 0.5}\n'), **METRICS),
    Case("metrics-step-absurd", "metrics.jsonl", append('{"step": 8000000000, "train/reward_mean": 0.5}\n'), **METRICS),
    Case("metrics-reward-1e9", "metrics.jsonl", append('{"step": 8, "train/reward_mean": 1e9}\n'), **METRICS),
    Case("metrics-reward-negative", "metrics.jsonl", append('{"step": 8, "train/reward_mean": -4.0}\n'), **METRICS),
    Case("metrics-reward-nan", "metrics.jsonl", append('{"step": 8, "train/reward_mean": NaN, "train/loss": Infinity}\n'), **METRICS),
    Case("metrics-reward-string", "metrics.jsonl", append('{"step": 8, "train/reward_mean": "high"}\n'), **METRICS),
    Case("metrics-not-objects", "metrics.jsonl", append('[1, 2]\n"step"\nnull\n'), **METRICS),
    Case("metrics-bool-step", "metrics.jsonl", append('{"step": true, "train/reward_mean": 0.5}\n'), **METRICS),
    # attempts.jsonl
    Case("attempts-folder", "attempts.jsonl", folder, named_by=frozenset({"status", "report"}) | RES, refused_by=RES,
         commands=READERS | RES),
    Case("attempts-not-utf8", "attempts.jsonl", append(b"\x80\x81\n"), named_by=frozenset({"status", "report"}), commands=READERS | RES),
    Case("attempts-rung-string", "attempts.jsonl", append('{"attempt": 2, "rung": "zero", "outcome": "oom"}\n'),
         named_by=frozenset({"status", "report"}), commands=READERS | RES),
    Case("attempts-rung-negative", "attempts.jsonl", append('{"attempt": 2, "rung": -1, "outcome": "oom"}\n'),
         named_by=frozenset({"status", "report"}), commands=READERS | RES),
    Case("attempts-wall-negative", "attempts.jsonl", append('{"attempt": 2, "rung": 0, "outcome": "completed", "wall_time_s": -9e9}\n'),
         named_by=frozenset(), commands=READERS | RES),
    # training_stats.json (report's wall time when attempts.jsonl has none)
    Case("stats-folder", "training_stats.json", folder, named_by=frozenset()),
    Case("stats-not-utf8", "training_stats.json", not_utf8, named_by=frozenset()),
    Case("stats-a-list", "training_stats.json", write("[1, 2]"), named_by=frozenset()),
    Case("stats-wall-negative", "training_stats.json", edit(setitem("summary", "wall_time_s_this_attempt", value=-5.0)),
         named_by=frozenset()),
    # eval_results.json: the final evaluation (status, report and index all show it)
    Case("final-folder", "eval_results.json", folder, **EVAL_FINAL),
    Case("final-not-utf8", "eval_results.json", not_utf8, **EVAL_FINAL),
    Case("final-truncated", "eval_results.json", truncate, **EVAL_FINAL),
    Case("final-a-list", "eval_results.json", write("[0.5]"), **EVAL_FINAL),
    Case("final-accuracy-string", "eval_results.json", edit(setitem("accuracy", "math_verify", value="0.9")), **EVAL_FINAL),
    Case("final-accuracy-7.5", "eval_results.json", edit(setitem("accuracy", "math_verify", value=7.5)), **EVAL_FINAL),
    Case("final-accuracy-negative", "eval_results.json", edit(setitem("accuracy", "math_verify", value=-0.3)), **EVAL_FINAL),
    Case("final-accuracy-nan", "eval_results.json", edit(setitem("accuracy", "math_verify", value=float("nan"))), **EVAL_FINAL),
    Case("final-accuracy-infinity", "eval_results.json", edit(setitem("accuracy", "math_verify", value=float("inf"))), **EVAL_FINAL),
    Case("final-accuracy-bool", "eval_results.json", edit(setitem("accuracy", "math_verify", value=True)), **EVAL_FINAL),
    Case("final-lenient-7.5", "eval_results.json", edit(setitem("accuracy", "lenient", value=7.5)), **EVAL_FINAL),
    Case("final-total-zero", "eval_results.json", edit(setitem("total", value=0)), **EVAL_FINAL),
    Case("final-total-string", "eval_results.json", edit(setitem("total", value="16")), **EVAL_FINAL),
    Case("final-step-string", "eval_results.json", edit(setitem("step", value="8")), **EVAL_FINAL),
    Case("final-step-absurd", "eval_results.json", edit(setitem("step", value=8000000000)), **EVAL_FINAL),
    Case("final-correct-above-total", "eval_results.json", edit(setitem("correct", "math_verify", value=99)), **EVAL_FINAL),
    Case("final-ci-outside", "eval_results.json", edit(setitem("ci95", "math_verify", value=[-0.5, 1.5])), **EVAL_FINAL),
    Case("final-protocol-string", "eval_results.json", edit(setitem("protocol", value="qwen_boxed")), **EVAL_FINAL),
    Case("final-primary-missing", "eval_results.json", edit(setitem("primary", value="lm_eval_strict")), **EVAL_FINAL),
    Case("final-schema-99", "eval_results.json", edit(setitem("schema_version", value=99)), **EVAL_FINAL),
    Case("final-pass-at-k-7", "eval_results.json", edit(setitem("pass_at_k", value={"samples": 4, "math_verify": {"1": 7.0}})),
         **EVAL_FINAL),
    Case("final-baseline-embedded-7.5", "eval_results.json", edit(setitem("baseline", "accuracy", "math_verify", value=7.5)),
         named_by=frozenset({"report", "index"})),
    # eval_baseline.json and evals/
    Case("baseline-folder", "eval_baseline.json", folder, named_by=frozenset({"report", "index"})),
    Case("baseline-not-utf8", "eval_baseline.json", not_utf8, named_by=frozenset({"report", "index"})),
    Case("baseline-accuracy-7.5", "eval_baseline.json", edit(setitem("accuracy", "math_verify", value=7.5)),
         named_by=frozenset({"report", "index"})),
    Case("evals-a-file", "evals", a_file, named_by=EV, refused_by=EV | RES, commands=ALL),
    Case("evals-step-folder", "evals/step_000004.json", folder, named_by=frozenset({"report", "index"})),
    Case("evals-step-not-utf8", "evals/step_000004.json", not_utf8, named_by=frozenset({"report", "index"})),
    Case("evals-step-accuracy-negative", "evals/step_000004.json", edit(setitem("accuracy", "math_verify", value=-1)),
         named_by=frozenset({"report", "index"})),
    # best_checkpoint.json (SFT keep_best; model.adapter reads it)
    Case("best-folder", "best_checkpoint.json", folder, named_by=frozenset()),
    Case("best-not-utf8", "best_checkpoint.json", not_utf8, named_by=frozenset()),
    # logs/
    Case("logs-a-file", "logs", a_file, named_by=frozenset({"status"}) | RES, refused_by=RES, commands=READERS | RES),
    Case("current-attempt-folder", "logs/current_attempt.json", folder, named_by=RES, refused_by=RES, commands=READERS | RES),
    Case("current-attempt-not-utf8", "logs/current_attempt.json", not_utf8, named_by=frozenset(), commands=READERS | RES),
    Case("current-attempt-rung-string", "logs/current_attempt.json", write('{"rung": "0", "step0": 0, "closed": false}'),
         named_by=frozenset(), commands=READERS | RES),
    Case("current-attempt-a-list", "logs/current_attempt.json", write("[]"), named_by=frozenset(), commands=READERS | RES),
    Case("job-events-folder", "logs/job_events.jsonl", folder, named_by=frozenset({"status"}) | RES, refused_by=RES,
         commands=READERS | RES),
    Case("job-events-not-utf8", "logs/job_events.jsonl", append(b"\xc3\x28\n"), named_by=frozenset({"status"})),
    Case("job-events-event-int", "logs/job_events.jsonl", append('{"event": 5}\n'), named_by=frozenset({"status"})),
    Case("lock-folder", "run.lock", folder, named_by=RES, refused_by=RES, commands=READERS | RES),
    # .finellama_run, the run marker (ownership.py): readers never need it; resume must not trip on it
    Case("marker-folder", ".finellama_run", folder, named_by=RES, refused_by=RES, commands=READERS | RES),
    Case("marker-not-utf8", ".finellama_run", write(b'{"kind": "\xff\xfe"}'), named_by=frozenset(), maybe_refused_by=RES,
         commands=READERS | RES),
    Case("marker-a-list", ".finellama_run", write("[1, 2]"), named_by=frozenset(), maybe_refused_by=RES, commands=READERS | RES),
    Case("lock-not-utf8", "run.lock", write(b"\xff\xfe\x00"), named_by=RES, refused_by=RES, commands=READERS | RES),
    # the sweep's ledger and the results index
    Case("ledger-folder", "@sweep/ledger.jsonl", folder, named_by=frozenset({"status"})),
    Case("ledger-not-utf8", "@sweep/ledger.jsonl", append(b"\xff\n"), named_by=frozenset({"status"})),
    Case("ledger-job-id-list", "@sweep/ledger.jsonl", append('{"run": "grpo-tiny-cpu", "job_id": [1, 2]}\n'),
         named_by=frozenset({"status"})),
    Case("index-folder", "@root/eval_results.json", folder, named_by=frozenset({"index"})),
    Case("index-not-utf8", "@root/eval_results.json", not_utf8, named_by=frozenset()),
    Case("index-wrong-schema", "@root/eval_results.json", edit(setitem("schema_version", value="two")), named_by=frozenset()),
    Case("index-entry-accuracy-7.5", "@root/eval_results.json", edit(lambda d: d["entries"][0]["accuracy"].update(math_verify=7.5)),
         named_by=frozenset()),
    # checkpoints/: the newest checkpoint damaged (evaluate checkpoint=latest refuses it; a resumed run falls back to step 4)
    Case("checkpoints-a-file", "checkpoints", a_file, named_by=EV | RES, refused_by=EV | RES, commands=ALL),
    Case("state-folder", f"{CKPT}/finellama_state.json", folder, **CHECKPOINT),
    Case("state-not-utf8", f"{CKPT}/finellama_state.json", not_utf8, **CHECKPOINT),
    Case("state-a-list", f"{CKPT}/finellama_state.json", write("[8]"), **CHECKPOINT),
    Case("state-step-string", f"{CKPT}/finellama_state.json", edit(setitem("step", value="8")), **CHECKPOINT),
    Case("state-step-other-folder", f"{CKPT}/finellama_state.json", edit(setitem("step", value=4)), **CHECKPOINT),
    Case("state-manifest-escapes", f"{CKPT}/finellama_state.json",
         edit(setitem("manifest", value={"../../config.yaml": {"bytes": 1, "sha256": "00"}})), **CHECKPOINT),
    Case("state-manifest-a-string", f"{CKPT}/finellama_state.json", edit(setitem("manifest", value="all good")), **CHECKPOINT),
    Case("adapter-truncated", f"{CKPT}/adapter_model.safetensors", truncate, **CHECKPOINT),
    Case("adapter-truncated-at-save", f"{CKPT}/adapter_model.safetensors", damaged_before_commit(truncate), **CHECKPOINT),
    Case("adapter-header-garbage-at-save", f"{CKPT}/adapter_model.safetensors",
         damaged_before_commit(write(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json" + b" " * 40)), **CHECKPOINT),
    Case("adapter-folder", f"{CKPT}/adapter_model.safetensors", folder, **CHECKPOINT),
    Case("adapter-config-not-utf8-at-save", f"{CKPT}/adapter_config.json", damaged_before_commit(write(b"\xff\xfe{}")), **CHECKPOINT),
    Case("adapter-config-a-list-at-save", f"{CKPT}/adapter_config.json", damaged_before_commit(write("[]")), **CHECKPOINT),
    Case("rng-planted-pickle-at-save", f"{CKPT}/rng_state.pth", damaged_before_commit(planted_pickle),
         named_by=RES, refused_by=RES, commands=EV | RES),
    Case("optimizer-garbage-at-save", f"{CKPT}/optimizer.pt", damaged_before_commit(write(b"\x00" * 64)),
         named_by=RES, refused_by=RES, commands=EV | RES),
]


def test_the_table_covers_every_file_of_a_run_folder():
    """At least 60 cases, and one for every file and folder results.py names that a finished run holds."""
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    targets = {c.target.split("/")[0] if not c.target.startswith(("@", "checkpoints/")) else c.target for c in CASES}
    held = {"config.yaml", "metrics.jsonl", "attempts.jsonl", "training_stats.json", "eval_results.json", "eval_baseline.json",
            "evals", "best_checkpoint.json", "logs", "run.lock", "checkpoints", "@sweep/ledger.jsonl", "@root/eval_results.json"}
    assert held <= targets | {c.target for c in CASES}, held - targets
    assert {"finellama_state.json", "adapter_model.safetensors", "adapter_config.json", "rng_state.pth", "optimizer.pt"} <= {
        Path(c.target).name for c in CASES if c.target.startswith(CKPT)}
    assert {"logs/current_attempt.json", "logs/job_events.jsonl"} <= {c.target for c in CASES}


# ------------------------------------------------------------------ running the commands in this process


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    reached_loading: bool = False
    result: object = None
    lines: List[str] = field(default_factory=list)  # stderr and log lines


def run_command(main: Callable, argv: List[str], capsys, caplog) -> Outcome:
    """main(argv) as cli_main runs it (a FinellamaError: one `error:` line and its exit code);
    anything else escaping is a traceback and fails the test."""
    caplog.clear()
    forget_warnings()  # each command as its own process
    reached = False
    try:
        rc = main(argv) or 0
    except ReachedLoading:
        rc, reached = 0, True
    except FinellamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = exit_code(exc)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - what a user would see as a traceback
        import traceback

        pytest.fail(f"{main.__module__}.main({argv}) raised {type(exc).__name__}:\n{traceback.format_exc()}")
    captured = capsys.readouterr()
    lines = captured.err.splitlines() + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in captured.out + captured.err + caplog.text
    return Outcome(rc, captured.out, captured.err, reached, lines=lines)


def percentages(text: str) -> List[float]:
    return [float(x) for x in re.findall(r"(-?\d+(?:\.\d+)?)%", text)]


def in_range(value, lo, hi) -> bool:
    return value is None or (isinstance(value, (int, float)) and lo <= value <= hi)


def check_status(o: Outcome) -> Optional[float]:
    """Every number of status --json within its range; returns the final accuracy shown."""
    (row,) = json.loads(o.out)
    assert in_range(row["accuracy"], 0, 1) and in_range(row["strict"], 0, 1) and in_range(row["lenient"], 0, 1), row
    assert in_range(row["last_step"], 0, MAX_STEPS) and row["max_steps"] in (None, MAX_STEPS), row
    assert in_range(row["last_reward"], *REWARD_RANGE) and row["requeues"] >= 0, row
    assert row["attempts"] is None or row["attempts"] >= 0, row
    return row["accuracy"]


def check_views(views) -> None:
    for v in views:
        if v is None:
            continue
        assert 0 <= v.accuracy <= 1 and v.n >= 0 and (v.step is None or 0 <= v.step <= MAX_STEPS), v
        assert v.ci is None or 0 <= v.ci[0] <= v.ci[1] <= 1, v
        assert in_range(v.strict, 0, 1) and in_range(v.lenient, 0, 1), v


def check_report(rep) -> Optional[float]:
    (r,) = rep.runs
    check_views([r.baseline, r.final, *r.points])
    assert 0 <= r.steps <= MAX_STEPS and (r.wall_s is None or r.wall_s >= 0) and 0 <= r.oom_attempts <= len(r.attempts)
    for m in r.metrics:
        assert 0 <= m["step"] <= MAX_STEPS and in_range(m.get("train/reward_mean"), *REWARD_RANGE), m
    assert all(0 <= p <= 100 for p in percentages(rep.table)), rep.table
    return r.final.accuracy if r.final else None


def check_index(root: Path, o: Outcome) -> Optional[float]:
    from finellama_rl.eval.results_index import read_index

    entries = read_index(root / "eval_results.json")
    for e in entries:
        assert 1 <= e["n"] and 0 <= e["step"] <= MAX_STEPS, e
        assert all(0 <= a <= 1 for a in e["accuracy"].values()), e
        assert all(c is None or 0 <= c <= e["n"] for c in e["correct"].values()), e
        assert all(ci is None or 0 <= ci[0] <= ci[1] <= 1 for ci in e["ci95"].values()), e
        for scorer, ks in (e["pass_at_k"] or {}).items():
            assert all(0 <= v <= 1 for v in ks.values()), e
    assert all(0 <= p <= 100 for p in percentages(o.out)), o.out
    final = [e for e in entries if e["path"] == f"{SWEEP}/{RUN}/eval_results.json"]
    return final[0]["accuracy"][final[0]["primary"]] if final else None


def plot_data(runs, out: Path) -> dict:
    """What report's plots would draw (write_plots' inputs), each point within its range; no PNGs."""
    from finellama_rl.eval.sweep_report import accuracy_series
    from finellama_rl.fileio import number_or_none

    for r in runs:
        for key, (lo, hi) in (("train/reward_mean", REWARD_RANGE), ("train/loss", (-1e6, 1e6))):
            for m in r.metrics:
                assert in_range(number_or_none(m.get(key)), lo, hi) and 0 <= m["step"] <= MAX_STEPS, m
        assert 0 <= r.oom_attempts <= len(r.attempts)
    for points in accuracy_series(runs).values():
        assert all(0 <= step <= MAX_STEPS and 0 <= lo <= y <= hi <= 100 for step, y, lo, hi in points), points
    return {}


@pytest.fixture
def stub_loading(monkeypatch):
    """Model loading replaced by ReachedLoading: evaluate and resume stop where they would load."""
    import finellama_rl.job.model as model
    import finellama_rl.trainers.run as trainer_run

    def reached(*a, **k):
        raise ReachedLoading()

    monkeypatch.setattr(model, "load_tokenizer", reached)
    monkeypatch.setattr(trainer_run, "load_tokenizer", reached)
    monkeypatch.setattr(status.shutil, "which", lambda name: None)  # no sacct: states from the files


def target_path(root: Path, target: str) -> Path:
    if target.startswith("@root/"):
        return root / target[len("@root/"):]
    if target.startswith("@sweep/"):
        return root / SWEEP / target[len("@sweep/"):]
    return root / SWEEP / RUN / target


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_file_gives_one_line_and_no_wrong_number(case, pristine, tmp_path, capsys, caplog, stub_loading, monkeypatch):
    caplog.set_level(logging.WARNING)
    root = tmp_path / "results"
    shutil.copytree(pristine, root)
    run = root / SWEEP / RUN
    for p in (run / "config.yaml", root / SWEEP / "ledger.jsonl"):  # they name where the run lies: the copy
        p.write_text(p.read_text().replace(str(pristine), str(root)))
    path = target_path(root, case.target)
    case.damage(path)
    name = path.name
    outcomes: Dict[str, Outcome] = {}
    shown: Dict[str, Optional[float]] = {}
    if "status" in case.commands:
        outcomes["status"] = o = run_command(status.main, [str(root / SWEEP), "--json"], capsys, caplog)
        shown["status"] = check_status(o)
        run_command(status.main, [str(root / SWEEP)], capsys, caplog)  # the table prints the same numbers
    if "report" in case.commands:
        from finellama_rl.eval import sweep_report

        caplog.clear()
        forget_warnings()
        monkeypatch.setattr(sweep_report, "write_plots", plot_data)  # the plots' data, checked; drawn in the test below
        rep = sweep_report.write_report(root / SWEEP)
        captured = capsys.readouterr()
        outcomes["report"] = Outcome(0, captured.out, captured.err, lines=captured.err.splitlines())
        shown["report"] = check_report(rep)
    if "index" in case.commands:
        outcomes["index"] = o = run_command(index.main, [str(root)], capsys, caplog)
        shown["index"] = check_index(root, o)
    if "evaluate" in case.commands:
        outcomes["evaluate"] = run_command(evaluate.main, [f"run={run}", "checkpoint=latest"], capsys, caplog)
    if "resume" in case.commands:
        if case.target != "eval_results.json":
            (run / "eval_results.json").unlink(missing_ok=True)  # unfinished: a resume goes on to load the model
        argv = [*OVERRIDES, f"run.results_dir={root}", f"run.sweep={SWEEP}", f"run.name={RUN}"]
        outcomes["resume"] = run_command(train.main, argv, capsys, caplog)

    for cmd, o in outcomes.items():
        naming = [line for line in o.lines if name in line]
        if cmd in case.refused_by:
            assert o.rc == 2 and len([l for l in o.err.splitlines() if l.startswith("error:")]) == 1, (cmd, o)
            assert any(l.startswith("error:") and name in l for l in o.err.splitlines()), (cmd, o.err)
        elif cmd in case.maybe_refused_by:
            assert o.rc in (0, 2), (cmd, o)
        else:
            assert o.rc == 0, (cmd, o.rc, o.err)
        if cmd in case.named_by:
            assert len(naming) == 1, (cmd, name, o.lines, o.out[:300], o.err)
        assert len(naming) <= 1, (cmd, name, o.lines)  # one line per file, not one per value
    finals = {cmd: v for cmd, v in shown.items()}
    assert len({None if v is None else round(v, 9) for v in finals.values()}) <= 1, finals  # index, status, report agree


def test_report_draws_every_plot_from_a_folder_damaged_in_many_places(pristine, tmp_path, capsys):
    """The table above checks the plots' data; here report draws them (PNGs) from one folder
    where the final accuracy is a string (matplotlib's errorbar failed on it), a reward is
    1e9 and another NaN, a step evaluation is negative, the baseline 7.5 and a wall time negative."""
    from PIL import Image

    from finellama_rl.eval import sweep_report

    root = tmp_path / "results"
    shutil.copytree(pristine, root)
    for case_id in ("final-accuracy-string", "metrics-reward-1e9", "metrics-reward-nan", "evals-step-accuracy-negative",
                    "baseline-accuracy-7.5", "attempts-wall-negative"):
        case = next(c for c in CASES if c.id == case_id)
        case.damage(target_path(root, case.target))
    rep = sweep_report.write_report(root / SWEEP)
    err = capsys.readouterr().err
    assert check_report(rep) is None  # the final evaluation is not shown at all
    for png in rep.images.values():
        assert Image.open(png).size == (800, 450)
    for name in ("eval_results.json", "metrics.jsonl", "step_000004.json", "eval_baseline.json"):
        assert len([line for line in err.splitlines() if name in line]) == 1, (name, err)
    assert "Traceback" not in err and all(0 <= p <= 100 for p in percentages(rep.markdown.read_text()))
