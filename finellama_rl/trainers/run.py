"""One training run on the compute node, start to end: take the run folder's lock, walk
the OOM ladder (job/oom_loop.py), and in each attempt resume from the newest complete
checkpoint (or OOM snapshot), load the 4-bit base with LoRA, evaluate the baseline,
train with the run's algorithm, evaluate, and write config.yaml, metrics.jsonl,
training_stats.json and eval_results.json.

    run_training(cfg)   # what `python -m finellama_rl.train` runs in each process

An attempt, step by step (`train_attempt`): `resume_point` -> `load_policy_for` ->
`training_rows` -> `Evaluations` (baseline, during training, final) -> `build_context`
-> the algorithm (`algorithm(trainer.algo)`) -> `finish`. With several ranks, rank 0 alone writes
files and evaluates.

Exit codes (finellama_rl/errors.py): 0 done, 2 bad input (or the folder is in use),
3 debug.crash_after_step, 4 out of memory on every rung, 75 stopped on a signal after
saving.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from finellama_rl.checkpoint import clear_staging, latest_resume_point, read_state, unusable_checkpoints
from finellama_rl.config import Algo, Config, Device, sft_max_steps
from finellama_rl.errors import EXIT_CRASH_TEST, EXIT_STOPPED, ConfigError
from finellama_rl.eval.core import eval_document, evaluate_model, format_accuracy, prepare_split_eval, summary
from finellama_rl.eval.passk import add_sampled_pass_at_k, format_pass_at_k
from finellama_rl.eval.results_index import add_eval_file, results_root
from finellama_rl.eval.schema import read_eval_document
from finellama_rl.fileio import atomic_write_json, is_disk_full
from finellama_rl.job import distributed as dist
from finellama_rl.job import faults
from finellama_rl.job.devices import cap_gpu_memory, free_memory, peak_memory_gb
from finellama_rl.job.model import count_parameters, load_policy, load_tokenizer
from finellama_rl.job.monitor import TrainingMonitor
from finellama_rl.job.oom_loop import AttemptHooks, AttemptRun, run_attempts
from finellama_rl.job.run_dir import (install_stop_handlers, job_deadline, last_logged_step, prepare_run_dir, refuse_unusable,
                                     rewind_metrics)
from finellama_rl.job.tracking import eval_scalars, open_tracker
from finellama_rl.ladder.attempts import record_unclosed_attempt
from finellama_rl.ladder.run_ladder import ladder_for, setting_of
from finellama_rl.ladder.rungs import Phase, Rung
from finellama_rl.results import RunPaths
from finellama_rl.resume import finished_step, record_max_steps
from finellama_rl.rewards import sources
from finellama_rl.runlock import RunLock, busy_reason
from finellama_rl.stats import write_training_stats
from finellama_rl.task.data import load_problems, with_prompts
from finellama_rl.task.protocols import prompt_format
from finellama_rl.task.splits import Split
from finellama_rl.trainers.base import TrainContext

log = logging.getLogger("finellama_rl")

OUTCOMES = {0: "completed", EXIT_STOPPED: "stopped", EXIT_CRASH_TEST: "crashed_on_purpose"}  # attempts.jsonl


def algorithm(algo: Algo) -> Callable[[TrainContext], Any]:
    """The train(ctx) function of trainer.algo (rm has a flow of its own: train_reward_model)."""
    if algo == Algo.grpo:
        from finellama_rl.trainers import grpo

        return grpo.train
    if algo == Algo.ppo:
        from finellama_rl.trainers import ppo

        return ppo.train
    if algo == Algo.sft:
        from finellama_rl.trainers import sft

        return sft.train
    raise ValueError(f"unknown trainer.algo {algo!r}: expected grpo|ppo|sft")


# ------------------------------------------------------------------ the whole run


def run_training(cfg: Config) -> int:
    """The whole run, holding the run folder's lock (one writer per folder: a second
    job or process on the same folder stops with exit 2, finellama_rl.runlock). A run
    that already finished changes nothing; one whose checkpoints all fail verification
    stops with exit 2 before anything is written."""
    lock = RunLock(Path(cfg.run.dir)) if os.environ.get("RANK", "0") == "0" else None  # torchrun: rank 0 holds it
    if lock is not None:
        take_lock(lock)
    try:
        if announce_finished(cfg):
            return 0
        check_resumable(cfg)
        return run_ladder(cfg)
    finally:
        if lock is not None:
            lock.release()


def announce_finished(cfg: Config) -> bool:
    """True (after saying so) when the resumed run already finished: nothing is written,
    no attempt is added, config.yaml stays as it is."""
    step = finished_step(cfg)
    if step is None:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"already finished at step {step}/{cfg.trainer.max_steps}: {cfg.run.dir} (nothing to do; raise "
              "trainer.max_steps to train further)", flush=True)
    return True


def check_resumable(cfg: Config) -> None:
    """ConfigError (exit 2) when the run folder holds checkpoints and none of them verifies:
    training must not silently start again from step 0. Nothing is moved or deleted."""
    if not cfg.run.resume:
        return
    problem = unusable_checkpoints(RunPaths(Path(cfg.run.dir)).checkpoints)
    if problem:
        raise ConfigError("run.resume", f"every checkpoint of {cfg.run.dir} fails verification ({problem}); nothing "
                          "was moved or deleted. Restore the damaged files to resume, or start this run over from "
                          f"step 0 with: python -m finellama_rl.train run.dir={cfg.run.dir} run.resume=false (the "
                          "run moves aside to <run>-previous-<time>; its config.yaml is reused)")


def take_lock(lock: RunLock) -> None:
    """Acquire the run folder's lock. On a disk so full that even the lock file cannot be
    written, a stale `checkpoints/.staging` (a save the full disk cut short) is cleared
    first when no live process holds the folder, so the restart is not blocked by it."""
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
    dist.init(cuda=cfg.hardware.device == Device.cuda)
    fraction = cap_gpu_memory() if cfg.hardware.device == Device.cuda else None
    if fraction is not None:
        log.info("packed run: this process may use %.0f%% of the GPU's memory", 100 * fraction)
    if dist.is_main():
        clear_staging(RunPaths(Path(cfg.run.dir)).checkpoints)  # first: a save cut by a full disk must not block the restart
        refuse_unusable(cfg, RunPaths(Path(cfg.run.dir)))  # a folder in a file's place, a planted pickle: exit 2 now
        prepare_run_dir(cfg)
    dist.barrier()
    paths = RunPaths(Path(cfg.run.dir))
    ladder = ladder_for(cfg) if cfg.ladder.enabled else [Rung(0, setting_of(cfg.trainer, cfg.hardware), False, "as configured")]
    if dist.is_main():
        record_unclosed_attempt(paths, ladder, last_logged_step(paths))  # an earlier process that was hard-killed
    dist.barrier()
    try:
        return run_attempts(cfg, paths, ladder, AttemptHooks(train_attempt, last_logged_step, attempt_fields,
                                                             free_memory, OUTCOMES))
    finally:
        dist.leave()


def attempt_fields(paths: RunPaths, step0: int, started: float, exc: Optional[BaseException]) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"steps_done": max(0, last_logged_step(paths) - step0),
                              "wall_time_s": round(time.time() - started, 2), **peak_memory_gb()}
    if exc is not None:
        fields["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return fields


# ------------------------------------------------------------------ one attempt, step by step


def train_attempt(cfg: Config, paths: RunPaths, run: Optional[AttemptRun] = None) -> int:
    """One attempt at one rung: resume (from the newest complete checkpoint or OOM
    snapshot), load, train, evaluate. With several ranks, rank 0 alone writes files."""
    import transformers

    t0 = time.time()
    run = run if run is not None else AttemptRun()
    resume_from, resumed, start_step = resume_point(cfg, paths)
    if already_complete(cfg, paths, start_step):
        return 0
    if cfg.trainer.algo == Algo.rm:  # trains a reward model, not the policy: its own flow (trainers/rm.py)
        return train_reward_model(cfg, paths)
    sources.check_sources_available(cfg)  # a missing reward model / judge: exit 2 before any model loads
    tokenizer = load_tokenizer(cfg.model)  # builds the tiny model on first use: before seeding, so it uses no run RNG
    transformers.set_seed(cfg.trainer.seed)
    policy = load_policy_for(cfg, paths, run)
    train_rows = training_rows(cfg, tokenizer)
    if cfg.trainer.max_steps != sft_max_steps(cfg.trainer, len(train_rows)):  # SFT: trainer.sft.epochs sets max_steps
        cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=sft_max_steps(cfg.trainer, len(train_rows))))
        log.info("trainer.sft.epochs=%g over %d examples: %d steps", cfg.trainer.sft.epochs, len(train_rows), cfg.trainer.max_steps)
        if dist.is_main():
            record_max_steps(paths, cfg.trainer.max_steps)  # config.yaml keeps the run's own settings, not the rung's
        if already_complete(cfg, paths, start_step):
            return 0
    evals = Evaluations(cfg, paths, tokenizer, run.tracker)  # protocol, shots, decoding
    evals.experiment = open_tracker(cfg, paths.root, start_step)  # TensorBoard / W&B; None with tracking=none
    baseline = evals.baseline(policy) if dist.is_main() else None
    if start_step == 0:
        evals.track(0, baseline)
    dist.barrier()
    if resumed.get("eval_pending"):  # an evaluation that ran out of memory right after this step: redo it
        evals.during(policy, start_step)
    ctx = build_context(cfg, paths, policy, tokenizer, train_rows, evals, resume_from, start_step, run)
    outcome = algorithm(cfg.trainer.algo)(ctx)
    return finish(cfg, paths, policy, outcome, evals, baseline, t0)


def resume_point(cfg: Config, paths: RunPaths) -> Tuple[Optional[Path], Dict[str, Any], int]:
    """(checkpoint to resume from, its state, its step); metric lines of later steps are
    set aside (rank 0)."""
    resume_from = latest_resume_point(paths.checkpoints) if cfg.run.resume else None
    resumed = read_state(resume_from) if resume_from else {}
    start_step = resumed.get("step", 0)
    log.info("run folder %s (%s)", paths.root, f"resuming from step {start_step}{' (OOM snapshot)' if resumed.get('snapshot') else ''}"
             if resume_from else "fresh start")
    discarded = rewind_metrics(paths, start_step) if dist.is_main() else 0
    dist.barrier()
    if discarded:
        log.warning("%d metric records after step %d came from work lost since that checkpoint; moved to %s",
                    discarded, start_step, paths.metrics_discarded.name)
    return resume_from, resumed, start_step


def already_complete(cfg: Config, paths: RunPaths, start_step: int) -> bool:
    if start_step >= cfg.trainer.max_steps and paths.eval_results.exists():
        print(f"already finished at step {start_step}/{cfg.trainer.max_steps}: {paths.root}", flush=True)
        return True
    return False


def train_reward_model(cfg: Config, paths: RunPaths) -> int:
    from finellama_rl.trainers import rm

    monitor = TrainingMonitor(cfg.trainer, paths, 0, f"rm {cfg.run.name}", cfg.debug.crash_after_step, job_deadline(),
                              step_sleep_s=cfg.debug.step_sleep_s)
    install_stop_handlers(monitor)
    return EXIT_STOPPED if rm.run(cfg, paths, monitor) else 0


def load_policy_for(cfg: Config, paths: RunPaths, run: AttemptRun):
    """The policy (4-bit base + LoRA), with this attempt's phase tracker and faults wired in."""
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    run.tracker = faults.install_fault_injection(policy, cfg.debug, paths)
    trainable, total = count_parameters(policy)
    log.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")
    return policy


def training_rows(cfg: Config, tokenizer) -> List[Dict[str, Any]]:
    """The training split as prompts under the evaluation protocol's format (zero-shot);
    ConfigError when no prompt fits trainer.max_prompt_tokens."""
    train_format = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)
    rows, dropped = with_prompts(load_problems(cfg.data, "train"), tokenizer, train_format, cfg.trainer.max_prompt_tokens)
    if dropped:
        log.warning("dropped %d training prompts longer than trainer.max_prompt_tokens=%d", dropped, cfg.trainer.max_prompt_tokens)
    if not rows:
        raise ConfigError("trainer.max_prompt_tokens", f"all {dropped} training prompts are longer than "
                          f"{cfg.trainer.max_prompt_tokens} tokens under eval.protocol={cfg.eval.protocol.value}; raise it")
    return rows


def build_context(cfg: Config, paths: RunPaths, policy, tokenizer, train_rows, evals: "Evaluations",
                  resume_from: Optional[Path], start_step: int, run: AttemptRun) -> TrainContext:
    """The monitor (progress, schedule, signals), the reward sources and everything the
    algorithm needs, in one TrainContext."""
    label = f"{cfg.trainer.algo.value} {cfg.run.name}"
    monitor = TrainingMonitor(cfg.trainer, paths, start_step, label, cfg.debug.crash_after_step, job_deadline(),
                              step_sleep_s=cfg.debug.step_sleep_s)
    monitor.experiment_tracker = evals.experiment
    install_stop_handlers(monitor)
    reward_funcs = sources.build_reward_sources(cfg)  # rule rewards and frozen scoring models (reward_model, judge)
    monitor.metric_sources += sources.metric_sources(reward_funcs)  # their scoring time and memory on every metrics line
    return TrainContext(cfg, paths, policy, tokenizer, train_rows, reward_funcs,
                        monitor, evals.during, resume_from, start_step, tracker=run.tracker, snapshots=run.snapshots)


def finish(cfg: Config, paths: RunPaths, policy, outcome, evals: "Evaluations", baseline, t0: float) -> int:
    """After the algorithm: training_stats.json, then (when it ran to the end) the final
    evaluation, eval_results.json and the index. Rank 0 writes; others return their code."""
    crashed = outcome.stop_reason == "debug.crash_after_step"
    if not dist.is_main():  # rank 0 evaluates and writes the results
        return EXIT_CRASH_TEST if crashed else (EXIT_STOPPED if outcome.stopped_early else 0)
    write_training_stats(paths, cfg, time.time() - t0)
    if outcome.stopped_early:
        evals.close()
        print(f"stopped at step {outcome.final_step} ({outcome.stop_reason}); run again to resume: {paths.root}", flush=True)
        return EXIT_CRASH_TEST if crashed else EXIT_STOPPED
    final = evals.evaluate(policy, outcome.final_step, "final")
    document = eval_document(cfg, outcome.final_step, final, baseline)
    if outcome.restored_step is not None:  # SFT keep_best: the evaluated weights are that checkpoint's
        document["restored_checkpoint_step"] = outcome.restored_step
    atomic_write_json(paths.eval_results, document)
    evals.track(outcome.final_step, final)
    evals.close()
    add_eval_file(results_root(cfg.run), paths.eval_results)  # the shared index; never fails the run
    write_training_stats(paths, cfg, time.time() - t0)
    base_txt = f" (baseline {format_accuracy(baseline)})" if baseline else ""
    print(f"final accuracy at step {outcome.final_step}: {format_accuracy(final)}{base_txt}", flush=True)
    print(f"results: {paths.root}", flush=True)
    return 0


@dataclass
class Evaluations:
    """Every evaluation of an attempt under the run's protocol, with pass@k when
    eval.samples > 1, written as eval files, added to the results index and sent to the
    trackers. The baseline and the final evaluation are on the test split (reported only);
    every trainer.eval_every steps on the validation split (what selections read: SFT
    keep-best, choosing a checkpoint or a recipe; task/splits.py)."""

    cfg: Config
    paths: RunPaths
    tokenizer: Any
    tracker: Any  # the attempt's PhaseTracker (an evaluation's OOM is attributed to Phase.eval)
    experiment: Any = None  # TensorBoard / W&B (job/tracking.py); None with tracking=none
    setups: Dict[Split, Any] = field(default_factory=dict)

    def __post_init__(self):  # prepared before training: a missing test file fails now, not after
        self.setup(Split.test)
        if self.cfg.trainer.eval_every:
            self.setup(Split.validation)

    def setup(self, split: Split):
        """The evaluation of `split`, prepared on first use (problems, prompts, shots)."""
        if split not in self.setups:
            adapter = "this run's policy at the evaluated step" if self.cfg.trainer.lora.enabled else None
            self.setups[split] = prepare_split_eval(self.cfg, self.tokenizer, split, adapter=adapter)
        return self.setups[split]

    def evaluate(self, model, step: int, desc: str = "eval", split: Split = Split.test) -> Dict[str, Any]:
        cfg = self.cfg
        setup = self.setup(split)
        desc = f"{desc} ({split.value})"
        with self.tracker.phase(Phase.eval):
            result = evaluate_model(model, self.tokenizer, setup, desc=f"{desc} step {step}")
            if cfg.eval.samples > 1:  # pass@1..k at every evaluation too (e.g. experiment=nanochat_rl)
                add_sampled_pass_at_k(result, model, self.tokenizer, setup, cfg.eval.samples, cfg.eval.sample_temperature,
                                      cfg.trainer.seed, desc=f"{desc} step {step} k={cfg.eval.samples}")
                log.info("%s step %d: %s", desc, step, format_pass_at_k(result["pass_at_k"]))
            return result

    def baseline(self, policy) -> Optional[Dict[str, Any]]:
        """The evaluation before training (written once; a resumed run reads it back)."""
        paths = self.paths
        if paths.baseline.exists():  # checked like every reader does; a damaged one is evaluated again
            kept = read_eval_document(paths.baseline)
            if kept is not None:
                return kept
            log.warning("evaluating the baseline again: %s cannot be used", paths.baseline)
        if not self.cfg.eval.before_training:
            return None
        result = self.evaluate(policy, 0, "baseline")
        atomic_write_json(paths.baseline, eval_document(self.cfg, 0, result, None))
        add_eval_file(results_root(self.cfg.run), paths.baseline)
        log.info("baseline accuracy: %s", format_accuracy(result))
        return result

    def during(self, model, step: int) -> Optional[Dict[str, Any]]:
        """An evaluation during training, on the validation split (every selection reads
        these): rank 0 evaluates and writes; the other ranks wait."""
        out = None
        if dist.is_main():
            result = self.evaluate(model, step, split=Split.validation)
            path = self.paths.eval_at_step(step)
            atomic_write_json(path, eval_document(self.cfg, step, result, None))
            add_eval_file(results_root(self.cfg.run), path)
            log.info("step %d validation accuracy: %s", step, format_accuracy(result))
            self.track(step, result)
            out = summary(result)
        dist.barrier()
        return out

    def track(self, step: int, result: Optional[Dict[str, Any]]) -> None:
        if self.experiment is not None and result is not None:
            self.experiment.log(step, eval_scalars(result))

    def close(self) -> None:
        if self.experiment is not None:
            self.experiment.close()
