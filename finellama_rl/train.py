"""One training run, start to end: resume from the latest checkpoint if any, load
the 4-bit base with LoRA, evaluate the baseline, train with PPO or GRPO, evaluate,
and write config.yaml, metrics.jsonl, training_stats.json and eval_results.json.

    python -m finellama_rl.train trainer=grpo model=qwen2.5-3b hardware=a100_80
    (the sbatch scripts in slurm/ call this; `finellama_rl.launch` runs sweeps)

Exit codes: 0 done, 2 bad input, 3 debug.crash_after_step, 4 out of memory on
every rung of the OOM ladder, 75 stopped by a signal
after saving (the caller may requeue). Knows nothing of SLURM beyond "a signal
asks me to save".
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from finellama_rl.config import Algo, Config
from finellama_rl.console import setup_logging
from finellama_rl.results import RunPaths, atomic_write_json, atomic_write_text

log = logging.getLogger("finellama_rl")

EXIT_CRASH_TEST = 3
EXIT_STOPPED = 75  # EX_TEMPFAIL: saved and stopped on request; run again to continue
EXIT_LADDER_EXHAUSTED = 4  # out of memory on every rung


def config_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def prepare_run_dir(cfg: Config) -> RunPaths:
    """Make the folder; with run.resume=false, move earlier outputs aside (never delete)."""
    paths = RunPaths(Path(cfg.run.dir))
    if not cfg.run.resume and paths.root.exists() and any(paths.root.iterdir()):
        aside = paths.root.with_name(paths.root.name + "-previous-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        shutil.move(str(paths.root), str(aside))
        log.info("run.resume=false: moved the earlier run to %s", aside)
    paths.make()
    atomic_write_text(paths.config, config_yaml(cfg))
    return paths


def job_deadline() -> Optional[float]:
    """Epoch seconds by which to have saved, from FINELLAMA_DEADLINE if the launcher set it."""
    value = os.environ.get("FINELLAMA_DEADLINE")
    return float(value) if value else None


def rewind_metrics(paths: RunPaths, step: int) -> int:
    """Keep metrics.jsonl consistent with the checkpoint we resume from: records of
    later steps (trained, then lost in a crash) move to metrics_discarded.jsonl."""
    from finellama_rl.results import append_jsonl, read_jsonl

    records = read_jsonl(paths.metrics)
    later = [r for r in records if r.get("step", 0) > step]
    if not later:
        return 0
    for r in later:
        append_jsonl(paths.metrics.with_name("metrics_discarded.jsonl"), r)
    kept = "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step)
    atomic_write_text(paths.metrics, kept)
    return len(later)


def install_stop_handlers(monitor) -> None:
    def handler(signum, _frame):
        log.warning("received %s: will save and stop after this step", signal.Signals(signum).name)
        monitor.request_stop(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, handler)


def algorithm(cfg: Config):
    if cfg.trainer.algo == Algo.grpo:
        from finellama_rl.trainers import grpo

        return grpo.train
    if cfg.trainer.algo == Algo.ppo:
        from finellama_rl.trainers import ppo

        return ppo.train
    raise ValueError(f"unknown trainer.algo {cfg.trainer.algo!r}: expected grpo|ppo")


def baseline_eval(cfg: Config, paths: RunPaths, evaluate_fn, policy) -> Optional[Dict[str, Any]]:
    from finellama_rl.eval.core import eval_document, format_accuracy
    from finellama_rl.results import read_json

    if paths.baseline.exists():
        return read_json(paths.baseline)
    if not cfg.eval.before_training:
        return None
    from finellama_rl.index import add_eval_file, results_root

    result = evaluate_fn(policy, 0, "baseline")
    atomic_write_json(paths.baseline, eval_document(cfg, 0, result, None))
    add_eval_file(results_root(cfg.run), paths.baseline)
    log.info("baseline accuracy: %s", format_accuracy(result))
    return result


def run_training(cfg: Config) -> int:
    """The whole run under the OOM ladder; returns the process exit code.

    An out-of-memory anywhere in an attempt (generation, forward, backward,
    optimizer) frees the model, moves to the next rung and continues from the
    latest checkpoint in this same process: no requeue, no queue time lost.
    """
    from finellama_rl.attempts import format_attempts, read_attempts, record_attempt, start_rung
    from finellama_rl.fitmem import remember_fit
    from finellama_rl.rungs import config_at, ladder_for, setting_of
    from finellama_rl.checkpoint import clear_staging
    from finellama_rl.ladder import Rung, format_ladder, is_oom_error, next_rung

    paths = prepare_run_dir(cfg)
    clear_staging(paths.checkpoints)
    ladder = ladder_for(cfg) if cfg.ladder.enabled else [Rung(0, setting_of(cfg), False, "as configured")]
    index = start_rung(cfg, paths, ladder)
    while index < len(ladder):
        rung = ladder[index]
        if index:
            log.warning("ladder rung %d: %s%s", index, rung.description,
                        " (CHANGES THE EXPERIMENT: shorter sequences)" if rung.changes_experiment else "")
        started, step0 = time.time(), last_logged_step(paths)
        # If the scheduler kills us (host OOM, uncatchable GPU OOM), the resubmit watchdog reads this.
        atomic_write_json(paths.logs / "current_attempt.json", {"rung": index, "step0": step0, "started": started,
                                                                "job_id": os.environ.get("SLURM_JOB_ID")})
        try:
            code = train_attempt(config_at(cfg, rung), paths)
        except Exception as exc:  # noqa: BLE001 - only OOMs are handled; everything else is re-raised
            fields = attempt_fields(paths, step0, started, exc)
            if not (cfg.ladder.enabled and is_oom_error(exc)):
                record_attempt(paths, rung, "error", **fields)
                raise
            traceback.clear_frames(exc.__traceback__)  # drop the frames that hold the model
            record_attempt(paths, rung, "oom", **fields)
            log.warning("out of memory at rung %d: %s", index, fields["error"])
        else:
            outcome = {0: "completed", EXIT_STOPPED: "stopped", EXIT_CRASH_TEST: "crashed_on_purpose"}.get(code, "failed")
            record_attempt(paths, rung, outcome, **attempt_fields(paths, step0, started, None))
            if code == 0 and cfg.ladder.remember_fit and cfg.ladder.enabled:
                remember_fit(cfg, rung)
            return code
        free_memory()
        index = (next_rung(ladder, index) or Rung(len(ladder), rung.setting, True, "end")).index
    print("out of memory on every rung of the ladder; attempts:\n" + format_attempts(read_attempts(paths)), flush=True)
    print("ladder:\n" + format_ladder(ladder), flush=True)
    return EXIT_LADDER_EXHAUSTED


def last_logged_step(paths: RunPaths) -> int:
    from finellama_rl.results import read_jsonl

    records = read_jsonl(paths.metrics)
    return int(records[-1]["step"]) if records else 0


def peak_memory_gb() -> Dict[str, Optional[float]]:
    import resource

    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_gpu_mem_gb": gpu, "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def attempt_fields(paths: RunPaths, step0: int, started: float, exc: Optional[BaseException]) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"steps_done": max(0, last_logged_step(paths) - step0),
                              "wall_time_s": round(time.time() - started, 2), **peak_memory_gb()}
    if exc is not None:
        fields["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return fields


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_attempt(cfg: Config, paths: RunPaths) -> int:
    """One attempt at one rung: resume, load, train, evaluate."""
    import transformers

    from finellama_rl.trainers.base import TrainContext
    from finellama_rl.attempts import install_fault_injection
    from finellama_rl.checkpoint import latest_checkpoint, read_state
    from finellama_rl.data import load_problems, with_prompts
    from finellama_rl.eval.core import eval_document, evaluate_model, format_accuracy, summary
    from finellama_rl.index import add_eval_file, results_root
    from finellama_rl.model import count_parameters, load_policy, load_tokenizer
    from finellama_rl.monitor import TrainingMonitor
    from finellama_rl.rewards.rules import build_reward_funcs
    from finellama_rl.stats import write_training_stats

    t0 = time.time()
    atomic_write_text(paths.config, config_yaml(cfg))  # the settings this attempt really uses
    resume_from = latest_checkpoint(paths.checkpoints) if cfg.run.resume else None
    start_step = read_state(resume_from)["step"] if resume_from else 0
    log.info("run folder %s (%s)", paths.root, f"resuming from step {start_step}" if resume_from else "fresh start")
    discarded = rewind_metrics(paths, start_step)
    if discarded:
        log.warning("%d metric records after step %d came from work lost since that checkpoint; moved to %s",
                    discarded, start_step, paths.metrics.with_name("metrics_discarded.jsonl").name)
    if start_step >= cfg.trainer.max_steps and paths.eval_results.exists():
        print(f"run already complete at step {start_step}: {paths.eval_results}", flush=True)
        return 0

    tokenizer = load_tokenizer(cfg.model)  # builds the tiny model on first use: before seeding, so it uses no run RNG
    transformers.set_seed(cfg.trainer.seed)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    install_fault_injection(policy, cfg)
    trainable, total = count_parameters(policy)
    log.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")
    train_rows, dropped = with_prompts(load_problems(cfg.data, "train"), tokenizer, cfg.data.system_prompt, cfg.trainer.max_prompt_tokens)
    if dropped:
        log.warning("dropped %d training prompts longer than trainer.max_prompt_tokens=%d", dropped, cfg.trainer.max_prompt_tokens)
    test_problems = load_problems(cfg.data, "test")
    shots = load_problems(cfg.data, "train")[: cfg.eval.shots] if cfg.eval.shots else []
    batch = cfg.eval.batch_size or cfg.trainer.micro_batch

    def evaluate_fn(model, step: int, desc: str = "eval") -> Dict[str, Any]:
        return evaluate_model(model, tokenizer, test_problems, cfg.data, cfg.eval, batch, shots, desc=f"{desc} step {step}")

    def evaluate_during(model, step: int) -> Dict[str, Any]:
        result = evaluate_fn(model, step)
        path = paths.root / "evals" / f"step_{step:06d}.json"
        atomic_write_json(path, eval_document(cfg, step, result, None))
        add_eval_file(results_root(cfg.run), path)
        log.info("step %d accuracy: %s", step, format_accuracy(result))
        return summary(result)

    baseline = baseline_eval(cfg, paths, evaluate_fn, policy)
    label = f"{cfg.trainer.algo.value} {cfg.run.name}"
    monitor = TrainingMonitor(cfg.trainer, paths, start_step, label, cfg.debug.crash_after_step, job_deadline())
    install_stop_handlers(monitor)
    ctx = TrainContext(cfg, paths, policy, tokenizer, train_rows, build_reward_funcs(cfg.trainer.rewards),
                       monitor, evaluate_during, resume_from, start_step)
    outcome = algorithm(cfg)(ctx)
    write_training_stats(paths, cfg, time.time() - t0)
    if outcome.stopped_early:
        print(f"stopped at step {outcome.final_step} ({outcome.stop_reason}); run again to resume: {paths.root}", flush=True)
        return EXIT_CRASH_TEST if outcome.stop_reason == "debug.crash_after_step" else EXIT_STOPPED

    final = evaluate_fn(policy, outcome.final_step, "final")
    atomic_write_json(paths.eval_results, eval_document(cfg, outcome.final_step, final, baseline))
    add_eval_file(results_root(cfg.run), paths.eval_results)  # the shared index; never fails the run
    write_training_stats(paths, cfg, time.time() - t0)
    base_txt = f" (baseline {format_accuracy(baseline)})" if baseline else ""
    print(f"final accuracy at step {outcome.final_step}: {format_accuracy(final)}{base_txt}", flush=True)
    print(f"results: {paths.root}", flush=True)
    return 0


def main(argv: List[str]) -> int:
    from finellama_rl.compose import load_config, split_argv

    multirun, overrides = split_argv(argv)
    if multirun:
        from finellama_rl.compose import UsageError

        raise UsageError("finellama_rl.train runs one run; use finellama_rl.launch -m for sweeps")
    cfg = load_config(overrides)
    setup_logging()
    return run_training(cfg)


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
