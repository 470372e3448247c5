"""One training run, start to end: resume from the latest checkpoint if any, load
the 4-bit base with LoRA, evaluate the baseline, train with PPO or GRPO, evaluate,
and write config.yaml, metrics.jsonl, training_stats.json and eval_results.json.

    python -m finellama_rl.train trainer=grpo model=qwen2.5-3b hardware=a100_80
    (the sbatch scripts in slurm/ call this; `finellama_rl.launch` runs sweeps)

Exit codes: 0 done, 2 bad input (or the run folder is in use by another job),
3 debug.crash_after_step, 4 out of memory on every rung of the OOM ladder,
74 disk full, 75 stopped by a signal
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
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from finellama_rl.config import Algo, Config, sft_max_steps
from finellama_rl.console import setup_logging
from finellama_rl.results import RunPaths
from finellama_rl.fileio import atomic_write_json, atomic_write_text
from finellama_rl.errors import EXIT_CRASH_TEST, EXIT_DISK_FULL, EXIT_STOPPED
from finellama_rl.compose import config_yaml

log = logging.getLogger("finellama_rl")



def prepare_run_dir(cfg: Config) -> RunPaths:
    """Make the folder (the caller holds its run.lock); with run.resume=false, move
    earlier outputs aside into a sibling folder (never delete; the lock stays)."""
    paths = RunPaths(Path(cfg.run.dir))
    earlier = [p for p in paths.root.iterdir() if p != paths.lock] if paths.root.is_dir() else []
    if not cfg.run.resume and earlier:
        aside = paths.root.with_name(paths.root.name + "-previous-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        aside.mkdir()
        for p in earlier:
            shutil.move(str(p), str(aside / p.name))
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
    from finellama_rl.fileio import append_jsonl, read_jsonl

    records = read_jsonl(paths.metrics, require={"step": int})  # malformed lines: warned, then dropped here
    later = [r for r in records if r["step"] > step]
    if not later:
        return 0
    for r in later:
        append_jsonl(paths.metrics_discarded, r)
    kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
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
    if cfg.trainer.algo == Algo.sft:
        from finellama_rl.trainers import sft

        return sft.train
    raise ValueError(f"unknown trainer.algo {cfg.trainer.algo!r}: expected grpo|ppo|sft")


def baseline_eval(cfg: Config, paths: RunPaths, evaluate_fn, policy) -> Optional[Dict[str, Any]]:
    from finellama_rl.eval.core import eval_document, format_accuracy
    from finellama_rl.fileio import read_json

    if paths.baseline.exists():
        return read_json(paths.baseline)
    if not cfg.eval.before_training:
        return None
    from finellama_rl.eval.results_index import add_eval_file, results_root

    result = evaluate_fn(policy, 0, "baseline")
    atomic_write_json(paths.baseline, eval_document(cfg, 0, result, None))
    add_eval_file(results_root(cfg.run), paths.baseline)
    log.info("baseline accuracy: %s", format_accuracy(result))
    return result


def run_training(cfg: Config) -> int:
    """The whole run, holding the run folder's lock (one writer per folder: a second
    job or process on the same folder stops with exit 2, finellama_rl.runlock)."""
    from finellama_rl.runlock import RunLock

    lock = RunLock(Path(cfg.run.dir)) if os.environ.get("RANK", "0") == "0" else None  # torchrun: rank 0 holds it
    if lock is not None:
        take_lock(lock)
    try:
        return run_ladder(cfg)
    finally:
        if lock is not None:
            lock.release()


def take_lock(lock) -> None:
    """Acquire the run folder's lock. On a disk so full that even the lock file cannot be
    written, a stale `checkpoints/.staging` (a save the full disk cut short) is cleared
    first when no live process holds the folder, so the restart is not blocked by it."""
    from finellama_rl.checkpoint import clear_staging
    from finellama_rl.fileio import is_disk_full
    from finellama_rl.runlock import busy_reason

    try:
        lock.acquire()
    except OSError as exc:
        if not is_disk_full(exc) or busy_reason(lock.run_dir) is not None:
            raise
        clear_staging(RunPaths(lock.run_dir).checkpoints)
        lock.acquire()


def run_ladder(cfg: Config) -> int:
    """The whole run under the OOM ladder (finellama_rl/job/oom_loop.py: the phase of an
    out-of-memory picks the knob to step down, and the failing step is retried from the
    host snapshot of the step before); returns the process exit code. Rank 0 prepares
    the run folder, the other ranks wait."""
    from finellama_rl.job import distributed as dist
    from finellama_rl.ladder.attempts import record_unclosed_attempt
    from finellama_rl.checkpoint import clear_staging
    from finellama_rl.config import Device
    from finellama_rl.ladder.rungs import Rung
    from finellama_rl.job.oom_loop import AttemptHooks, run_attempts
    from finellama_rl.ladder.run_ladder import ladder_for, setting_of

    dist.init(cuda=cfg.hardware.device == Device.cuda)
    if dist.is_main():
        clear_staging(RunPaths(Path(cfg.run.dir)).checkpoints)  # first: a save cut by a full disk must not block the restart
        prepare_run_dir(cfg)
    dist.barrier()
    paths = RunPaths(Path(cfg.run.dir))
    ladder = ladder_for(cfg) if cfg.ladder.enabled else [Rung(0, setting_of(cfg), False, "as configured")]
    if dist.is_main():
        record_unclosed_attempt(paths, ladder, last_logged_step(paths))  # an earlier process that was hard-killed
    dist.barrier()
    outcomes = {0: "completed", EXIT_STOPPED: "stopped", EXIT_CRASH_TEST: "crashed_on_purpose"}
    try:
        return run_attempts(cfg, paths, ladder, AttemptHooks(train_attempt, last_logged_step, attempt_fields,
                                                             free_memory, outcomes))
    finally:
        dist.leave()


def last_logged_step(paths: RunPaths) -> int:
    from finellama_rl.fileio import read_jsonl

    records = read_jsonl(paths.metrics, require={"step": int}, quiet=True)  # rewind_metrics warns about bad lines
    return records[-1]["step"] if records else 0


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


def train_attempt(cfg: Config, paths: RunPaths, run=None) -> int:
    """One attempt at one rung: resume (from the newest complete checkpoint or OOM
    snapshot), load, train, evaluate. With several ranks, rank 0 alone writes files."""
    import transformers

    from finellama_rl.job import distributed as dist
    from finellama_rl.ladder.rungs import Phase

    from finellama_rl.trainers.base import TrainContext
    from finellama_rl.job.faults import install_fault_injection
    from finellama_rl.checkpoint import latest_resume_point, read_state
    from finellama_rl.task.data import load_problems, with_prompts
    from finellama_rl.eval.core import eval_document, evaluate_model, format_accuracy, prepare_eval, summary
    from finellama_rl.task.protocols import prompt_format
    from finellama_rl.eval.results_index import add_eval_file, results_root
    from finellama_rl.job.model import count_parameters, load_policy, load_tokenizer
    from finellama_rl.job.monitor import TrainingMonitor
    from finellama_rl.rewards.sources import build_reward_sources, check_sources_available, metric_sources
    from finellama_rl.stats import write_training_stats
    from finellama_rl.job.tracking import eval_scalars, open_tracker
    from finellama_rl.eval.passk import add_sampled_pass_at_k, format_pass_at_k

    t0 = time.time()
    if run is None:
        from finellama_rl.job.oom_loop import AttemptRun

        run = AttemptRun()
    main = dist.is_main()
    if main:
        atomic_write_text(paths.config, config_yaml(cfg))  # the settings this attempt really uses
    resume_from = latest_resume_point(paths.checkpoints) if cfg.run.resume else None
    resumed = read_state(resume_from) if resume_from else {}
    start_step = resumed.get("step", 0)
    log.info("run folder %s (%s)", paths.root, f"resuming from step {start_step}{' (OOM snapshot)' if resumed.get('snapshot') else ''}"
             if resume_from else "fresh start")
    discarded = rewind_metrics(paths, start_step) if main else 0
    dist.barrier()
    if discarded:
        log.warning("%d metric records after step %d came from work lost since that checkpoint; moved to %s",
                    discarded, start_step, paths.metrics_discarded.name)
    if start_step >= cfg.trainer.max_steps and paths.eval_results.exists():
        print(f"run already complete at step {start_step}: {paths.eval_results}", flush=True)
        return 0

    if cfg.trainer.algo == Algo.rm:  # trains a reward model, not the policy: its own flow (trainers/rm.py)
        from finellama_rl.trainers import rm

        monitor = TrainingMonitor(cfg.trainer, paths, 0, f"rm {cfg.run.name}", cfg.debug.crash_after_step, job_deadline())
        install_stop_handlers(monitor)
        return EXIT_STOPPED if rm.run(cfg, paths, monitor) else 0
    check_sources_available(cfg)  # a missing reward model / judge: exit 2 before any model loads
    tokenizer = load_tokenizer(cfg.model)  # builds the tiny model on first use: before seeding, so it uses no run RNG
    transformers.set_seed(cfg.trainer.seed)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    run.tracker = tracker = install_fault_injection(policy, cfg, paths)
    trainable, total = count_parameters(policy)
    log.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")
    train_format = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)  # the eval protocol's prompt, zero-shot
    train_rows, dropped = with_prompts(load_problems(cfg.data, "train"), tokenizer, train_format, cfg.trainer.max_prompt_tokens)
    if dropped:
        log.warning("dropped %d training prompts longer than trainer.max_prompt_tokens=%d", dropped, cfg.trainer.max_prompt_tokens)
    if not train_rows:
        from finellama_rl.errors import ConfigError

        raise ConfigError("trainer.max_prompt_tokens", f"all {dropped} training prompts are longer than "
                          f"{cfg.trainer.max_prompt_tokens} tokens under eval.protocol={cfg.eval.protocol.value}; raise it")
    if cfg.trainer.max_steps != sft_max_steps(cfg.trainer, len(train_rows)):  # SFT: trainer.sft.epochs sets max_steps
        cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=sft_max_steps(cfg.trainer, len(train_rows))))
        log.info("trainer.sft.epochs=%g over %d examples: %d steps", cfg.trainer.sft.epochs, len(train_rows), cfg.trainer.max_steps)
        atomic_write_text(paths.config, config_yaml(cfg))
        if start_step >= cfg.trainer.max_steps and paths.eval_results.exists():
            print(f"run already complete at step {start_step}: {paths.eval_results}", flush=True)
            return 0
    test_problems = load_problems(cfg.data, "test")
    eval_setup = prepare_eval(cfg, tokenizer, test_problems, load_problems(cfg.data, "train"),  # protocol, shots, decoding
                              adapter="this run's policy at the evaluated step" if cfg.trainer.lora.enabled else None)

    def evaluate_fn(model, step: int, desc: str = "eval") -> Dict[str, Any]:
        with tracker.phase(Phase.eval):
            result = evaluate_model(model, tokenizer, eval_setup, desc=f"{desc} step {step}")
            if cfg.eval.samples > 1:  # pass@1..k at every evaluation too (e.g. experiment=nanochat_rl)
                add_sampled_pass_at_k(result, model, tokenizer, eval_setup, cfg.eval.samples, cfg.eval.sample_temperature,
                                      cfg.trainer.seed, desc=f"{desc} step {step} k={cfg.eval.samples}")
                log.info("%s step %d: %s", desc, step, format_pass_at_k(result["pass_at_k"]))
            return result

    def evaluate_during(model, step: int) -> Optional[Dict[str, Any]]:
        """Rank 0 evaluates and writes; the other ranks wait."""
        out = None
        if main:
            result = evaluate_fn(model, step)
            path = paths.eval_at_step(step)
            atomic_write_json(path, eval_document(cfg, step, result, None))
            add_eval_file(results_root(cfg.run), path)
            log.info("step %d accuracy: %s", step, format_accuracy(result))
            track(step, result)
            out = summary(result)
        dist.barrier()
        return out

    experiment = open_tracker(cfg, paths.root, start_step)  # TensorBoard / W&B; None with tracking=none

    def track(step: int, result: Optional[Dict[str, Any]]) -> None:
        if experiment is not None and result is not None:
            experiment.log(step, eval_scalars(result))

    baseline = baseline_eval(cfg, paths, evaluate_fn, policy) if main else None
    if start_step == 0:
        track(0, baseline)
    dist.barrier()
    if resumed.get("eval_pending"):  # an evaluation that ran out of memory right after this step: redo it
        evaluate_during(policy, start_step)
    label = f"{cfg.trainer.algo.value} {cfg.run.name}"
    monitor = TrainingMonitor(cfg.trainer, paths, start_step, label, cfg.debug.crash_after_step, job_deadline())
    monitor.experiment_tracker = experiment
    install_stop_handlers(monitor)
    reward_funcs = build_reward_sources(cfg)  # rule rewards and frozen scoring models (reward_model, judge)
    monitor.metric_sources += metric_sources(reward_funcs)  # their scoring time and memory on every metrics line
    ctx = TrainContext(cfg, paths, policy, tokenizer, train_rows, reward_funcs,
                       monitor, evaluate_during, resume_from, start_step, tracker=tracker, snapshots=run.snapshots)
    outcome = algorithm(cfg)(ctx)
    if not main:  # rank 0 evaluates and writes the results
        return EXIT_CRASH_TEST if outcome.stop_reason == "debug.crash_after_step" else (EXIT_STOPPED if outcome.stopped_early else 0)
    write_training_stats(paths, cfg, time.time() - t0)
    if outcome.stopped_early:
        if experiment is not None:
            experiment.close()
        print(f"stopped at step {outcome.final_step} ({outcome.stop_reason}); run again to resume: {paths.root}", flush=True)
        return EXIT_CRASH_TEST if outcome.stop_reason == "debug.crash_after_step" else EXIT_STOPPED

    final = evaluate_fn(policy, outcome.final_step, "final")
    document = eval_document(cfg, outcome.final_step, final, baseline)
    if outcome.restored_step is not None:  # SFT keep_best: the evaluated weights are that checkpoint's
        document["restored_checkpoint_step"] = outcome.restored_step
    atomic_write_json(paths.eval_results, document)
    track(outcome.final_step, final)
    if experiment is not None:
        experiment.close()
    add_eval_file(results_root(cfg.run), paths.eval_results)  # the shared index; never fails the run
    write_training_stats(paths, cfg, time.time() - t0)
    base_txt = f" (baseline {format_accuracy(baseline)})" if baseline else ""
    print(f"final accuracy at step {outcome.final_step}: {format_accuracy(final)}{base_txt}", flush=True)
    print(f"results: {paths.root}", flush=True)
    return 0


def supervise_ranks(cfg: Config, overrides: List[str]) -> Optional[int]:
    """A multi-device run (hardware.gpus_per_node or hardware.processes > 1) started as
    one process becomes the supervisor of its torchrun ranks (finellama_rl.job.distributed);
    returns their exit code. None: this process trains itself (one device, or a rank)."""
    from finellama_rl.job import distributed as dist
    from finellama_rl.config import world_size
    from finellama_rl.ladder.run_ladder import ladder_for

    if dist.is_worker():
        if not dist.is_main():
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress
        return None
    n = world_size(cfg.hardware)
    if n <= 1:
        return None
    if not cfg.run.resume:  # once, here: a rank restarted after an OOM must not move the run aside again
        from finellama_rl.runlock import RunLock

        lock = RunLock(Path(cfg.run.dir))
        lock.acquire()
        try:
            prepare_run_dir(cfg)
        finally:
            lock.release()
    r = cfg.run
    pinned = [*overrides, f"run.dir={r.dir}", f"run.sweep={r.sweep}", f"run.name={r.name}", "run.resume=true"]
    restarts = 2 * len(ladder_for(cfg)) + 8 if cfg.ladder.enabled else 0  # list rungs plus generation-batch cuts
    log.info("data parallel over %d processes (torchrun); supervising them", n)
    return dist.supervise(pinned, n, Path(r.dir), restarts)


def main(argv: List[str]) -> int:
    from finellama_rl.compose import load_config, split_argv

    multirun, overrides = split_argv(argv)
    if multirun:
        from finellama_rl.errors import UsageError

        raise UsageError("finellama_rl.train runs one run; use finellama_rl.launch -m for sweeps")
    cfg = load_config(overrides)
    setup_logging()
    supervised = supervise_ranks(cfg, overrides)
    if supervised is not None:
        return supervised
    try:
        return run_training(cfg)
    except Exception as exc:  # a full disk: one line that says so, not a torch traceback
        from finellama_rl.fileio import is_disk_full

        if not is_disk_full(exc, Path(cfg.run.dir)):
            raise
        print(f"error: disk full (or quota exceeded) under {cfg.run.dir}: {str(exc).splitlines()[0][:300]}; "
              "files written before stay intact; free space and run the same command again to resume", flush=True)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
