"""The built-in demonstration behind `make run`: on CPU, a tiny model learns the
synthetic task partly by SFT, and RL from that SFT adapter (4-bit base + LoRA, the
real correctness reward) raises its held-out accuracy.

    python -m finellama_rl.demo                        # SFT (first time only) -> GRPO -> report
    python -m finellama_rl.demo -m trainer=ppo,grpo    # both RL trainers from the same SFT start
    python -m finellama_rl.demo trainer.seed=1         # any override of the RL runs
    python -m finellama_rl.demo sft_seed=1 trainer.seed=1   # also another SFT (cached separately)
    python -m finellama_rl.demo --resume               # continue the latest demo sweep after a stop (Ctrl-C, SIGTERM)

1. SFT: `experiment=demo_sft` (trainer=sft on the tiny model), cached like the tiny
   model itself: in $FINELLAMA_CACHE (default $HF_HOME/finellama_rl)/sft/demo-<key>,
   where key hashes the SFT run's resolved config, the library versions and the source
   of the modules that shape it, so anything that would change the adapter retrains it.
   Overrides of model.*, data.* and eval.protocol apply to the SFT too (same model and task).
2. RL: `experiment=demo model.adapter=<that SFT run>` for every combination of the
   command line, planned and validated like `finellama_rl.launch` does, each run in this
   process (no second start-up), into results/demo-<date-time>/<run>.
3. The sweep report (report.md/.html, reward.png, accuracy.png) and one line per run:
   baseline -> final accuracy with 95% intervals.

This is the same code path as the manual SFT -> RL workflow in README.md; only the
cache and the chaining are the demo's.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from finellama_rl.compose import expand_sweep, load_config, split_argv
from finellama_rl.errors import EXIT_STOPPED, UsageError
from finellama_rl.config import Config, RunConfig
from finellama_rl.results import RunPaths

log = logging.getLogger("finellama_rl")

SFT_PRESET = "demo_sft"
RL_PRESET = "demo"
CACHE_VERSION = 1  # bump when the demo's SFT changes in a way the hashed sources do not show
SHARED_PREFIXES = ("model.", "data.", "eval.protocol")  # overrides that also shape the SFT
# PPO samples one completion per prompt: more prompts per step than GRPO's 8 x 8.
PER_TRAINER = {"ppo": ["trainer.prompts_per_step=32"]}
SHAPING_MODULES = ("task/data.py", "task/splits.py", "job/model.py", "job/adapters.py", "trainers/sft.py", "task/protocols.py")
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


def split_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(overrides for the SFT, overrides for RL). model.*, data.* and eval.protocol go to
    both and cannot be swept; `sft_seed=N` (the demo's own option) seeds the SFT only."""
    sft = [f"trainer.seed={o.split('=', 1)[1]}" for o in overrides if o.startswith("sft_seed=")]
    rl = [o for o in overrides if not o.startswith("sft_seed=")]
    shared = [o for o in rl if o.split("=")[0].lstrip("+").startswith(SHARED_PREFIXES) or o.startswith("model=")]
    if len(expand_sweep(shared + sft)) > 1:
        raise UsageError(f"the demo trains one SFT adapter: sweep RL settings only (not {' '.join(shared + sft)})")
    return shared + sft, rl


def sft_config(shared: Sequence[str]) -> Config:
    """The demo's SFT run config, its run folder in the cache under its key."""
    from finellama_rl.job.model import cache_root

    base = load_config([f"experiment={SFT_PRESET}", *shared], resolve_paths=False)
    folder = cache_root() / "sft" / f"demo-{cache_key(base)}"
    return load_config([f"experiment={SFT_PRESET}", *shared, f"run.results_dir={folder.parent}",
                        f"run.dir={folder}", "run.sweep=sft", f"run.name={folder.name}"])


def cache_key(cfg: Config) -> str:
    """Everything that changes the SFT adapter: config (without run folders), library
    versions, and the source of the modules that build the data, model and SFT."""
    from finellama_rl.compose import config_yaml

    here = Path(__file__).resolve().parent
    parts: Dict[str, Any] = {
        "config": config_yaml(replace(cfg, run=RunConfig())),
        "versions": {lib: importlib.metadata.version(lib) for lib in LIBRARIES},
        "sources": {m: hashlib.sha1((here / m).read_bytes()).hexdigest() for m in SHAPING_MODULES},
        "cache_version": CACHE_VERSION,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def ensure_sft(cfg: Config) -> Path:
    """The cached SFT run folder, trained under a file lock the first time."""
    from filelock import FileLock

    from finellama_rl.trainers.run import run_training

    folder = Path(cfg.run.dir)
    done = RunPaths(folder).eval_results
    if done.exists():
        print(f"SFT adapter (cached): {folder}", flush=True)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            print(f"=== SFT of the tiny model on the synthetic task (first time only; cached in {folder})", flush=True)
            code = run_training(cfg)
            if code != 0 or not done.exists():
                raise SystemExit(code or 1)
    return folder


def plan_rl(overrides: Sequence[str], adapter: Path, sweep: str):
    """Every RL run of the command line, composed and validated before anything trains (a
    typo fails before the SFT, not after). Each run gets its trainer's demo batch
    (PER_TRAINER) unless the command line sets it; run names follow launch's rules."""
    from finellama_rl.login.sweep import PlannedRun, check_distinct
    from finellama_rl.login.planner import choose_start_rung

    runs = []
    for i, (combo, name_parts) in enumerate(expand_sweep(overrides)):
        trainer = next((o.split("=", 1)[1] for o in combo if o.startswith("trainer=")), "grpo")
        typed = {o.split("=", 1)[0] for o in combo}
        extra = [o for o in PER_TRAINER.get(trainer, []) if o.split("=", 1)[0] not in typed]
        ovs = [f"experiment={RL_PRESET}", *extra, *combo, f"model.adapter={adapter}", f"run.sweep={sweep}", "launcher=local"]
        cfg = load_config(ovs, name_parts)
        rung, why = choose_start_rung(cfg)
        runs.append(PlannedRun(i, ovs, cfg, rung, why))
    check_distinct(runs)
    return runs


def run_rl(runs) -> List[Tuple[Any, int]]:
    """Each planned run in this process, through the same entry as `python -m finellama_rl.train`;
    a run stopped by a signal (saved, exit 75) stops the demo: the next runs do not start."""
    from finellama_rl.train import main as train_main

    results = []
    for r in runs:
        print(f"=== {r.cfg.trainer.algo.value.upper()} from the SFT adapter -> {r.cfg.run.dir}", flush=True)
        results.append((r, train_main(r.train_argv())))
        if results[-1][1] == EXIT_STOPPED:
            break
    return results


RESUME = "--resume"
RESUME_HINT = f"python -m finellama_rl.demo {RESUME}   (or: make run ARGS={RESUME})"


def resume_args(argv: Sequence[str]) -> Tuple[str, List[str]]:
    """(sweep, the demo's own arguments) of the latest demo sweep under run.results_dir (the
    only setting `--resume` takes), from its demo.json; UsageError when there is none."""
    from finellama_rl.fileio import read_json_object
    from finellama_rl.results import SweepPaths

    extra = [a for a in argv if not a.startswith("run.results_dir=")]
    if extra:
        raise UsageError(f"{RESUME} continues the latest demo sweep with the arguments it was started with; "
                         f"give no others (got {' '.join(extra)}), at most run.results_dir=DIR")
    root = Path(load_config([f"experiment={RL_PRESET}", *argv], resolve_paths=False).run.results_dir)
    sweeps = sorted(p for p in root.glob("demo-*") if SweepPaths(p).demo_args.is_file()) if root.is_dir() else []
    for sweep in reversed(sweeps):
        saved = read_json_object(SweepPaths(sweep).demo_args, "its arguments", require={"argv": list})
        if saved is not None and all(isinstance(a, str) for a in saved["argv"]):
            return sweep.name, [*saved["argv"], *argv]
    raise UsageError(f"no demo sweep to resume in {root}/ (demo-*/demo.json); start one: python -m finellama_rl.demo")


def stopped_hint(results: List[Tuple[Any, int]]) -> None:
    if any(code == EXIT_STOPPED for _, code in results):
        print(f"\nthe demo stopped on a signal after saving; continue it (same sweep, from the checkpoints): {RESUME_HINT}",
              flush=True)


def accuracy_line(run_dir: Path) -> str:
    """'<run>: baseline 31.2% [20.5, 43.2] -> final 56.2% [44.1, 67.6] (+25.0 points, n=64, protocol/scorer)'."""
    path = RunPaths(run_dir).eval_results
    if not path.exists():
        return f"{run_dir.name}: no final evaluation (see its log)"
    doc = json.loads(path.read_text())
    primary, base = doc["primary"], doc.get("baseline") or {}
    final_acc, final_ci = doc["accuracy"][primary], doc["ci95"][primary]
    if not base:
        return f"{run_dir.name}: final {_pct(final_acc, final_ci)} (no baseline)"
    base_acc, base_ci = base["accuracy"][primary], base["ci95"][primary]
    protocol = doc["protocol"].get("name", "") if isinstance(doc.get("protocol"), dict) else ""
    return (f"{run_dir.name}: baseline {_pct(base_acc, base_ci)} -> final {_pct(final_acc, final_ci)} "
            f"({100 * (final_acc - base_acc):+.1f} points, n={doc['total']}, {protocol}/{primary})")


def _pct(acc: float, ci: Sequence[float]) -> str:
    return f"{100 * acc:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def main(argv: Sequence[str]) -> int:
    import os

    # One thread unless told otherwise: the demo's 64-wide model gains little from a second
    # thread, and two OpenMP threads on a 2-core machine with any other busy process spin
    # against it (measured: 636 s instead of 59 s for the same run; docs/LOG.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from finellama_rl.console import setup_logging
    from finellama_rl.eval.sweep_report import write_report

    from finellama_rl.fileio import atomic_write_json
    from finellama_rl.results import SweepPaths

    given = [a for a in argv if a != RESUME]
    sweep, argv = resume_args(given) if RESUME in argv else ("demo-" + _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), given)
    multirun, overrides = split_argv(argv)
    shared, rl_overrides = split_overrides(overrides)
    sft = sft_config(shared)
    if len(expand_sweep(rl_overrides)) > 1 and not multirun:
        raise UsageError("comma-separated values sweep only with -m (e.g. -m trainer=ppo,grpo)")
    runs = plan_rl(rl_overrides, Path(sft.run.dir), sweep)
    atomic_write_json(SweepPaths(Path(runs[0].cfg.run.dir).parent).demo_args, {"argv": [a for a in argv if not
                                                                                       a.startswith("run.results_dir=")]})
    setup_logging()
    try:
        ensure_sft(sft)
    except SystemExit as exc:
        stopped_hint([(None, exc.code)])
        raise
    results = run_rl(runs)
    report = write_report(Path(runs[0].cfg.run.dir).parent)
    print("\n" + "\n".join(accuracy_line(Path(r.cfg.run.dir)) for r, _ in results), flush=True)
    print(f"report: {report.html}\n        {report.markdown} (plots: reward.png, accuracy.png)", flush=True)
    stopped_hint(results)
    failed = [code for _, code in results if code]
    return failed[0] if failed else 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main, overrides=True, preset=("experiment=demo",))
