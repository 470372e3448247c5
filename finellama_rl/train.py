"""One training run, start to end (finellama_rl/trainers/run.py): resume from the latest
checkpoint if any, load the 4-bit base with LoRA, evaluate the baseline, train with PPO,
GRPO or SFT, evaluate, and write config.yaml, metrics.jsonl, training_stats.json and
eval_results.json.

    python -m finellama_rl.train trainer=grpo model=qwen2.5-3b hardware=a100_80
    (the sbatch scripts in slurm/ call this; `finellama_rl.launch` runs sweeps)

A multi-device run (hardware.gpus_per_node or hardware.processes > 1) started as one
process supervises its torchrun ranks (finellama_rl/job/distributed.py); with
hardware.nodes=N the SLURM job starts one such supervisor per node.

Resuming (`run.dir=` of an existing run, a requeue) trains with the run folder's own
config.yaml: settings on the command line that differ from it are refused (exit 2,
finellama_rl/resume.py); a finished run says so and changes nothing.

Exit codes (finellama_rl/errors.py): 0 done (or already finished), 2 bad input (or the
run folder is in use by another job, is not a run folder, or has no checkpoint that
verifies), 3 debug.crash_after_step, 4 out of memory on every rung of the OOM ladder,
74 disk full, 75 stopped by a signal after saving (the caller may requeue).
Knows nothing of SLURM beyond "a signal asks me to save".
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import List, Optional

from finellama_rl.compose import split_argv
from finellama_rl.config import Config, Device, processes_per_node, world_size
from finellama_rl.console import setup_logging
from finellama_rl.errors import EXIT_DISK_FULL, ConfigError, UsageError
from finellama_rl.fileio import is_disk_full
from finellama_rl.resume import start_config
from finellama_rl.trainers.run import announce_finished, check_resumable, run_training

log = logging.getLogger("finellama_rl")


def _prepare_once(cfg: Config) -> None:
    """Once per job, here: a rank restarted after an OOM must not move the run aside again."""
    from finellama_rl.job.run_dir import prepare_run_dir
    from finellama_rl.ownership import claim
    from finellama_rl.runlock import RunLock

    lock = RunLock(Path(cfg.run.dir))
    lock.acquire()
    try:
        if not cfg.run.resume:
            prepare_run_dir(cfg)
        else:
            claim(Path(cfg.run.dir), "train", resume=True)
    finally:
        lock.release()


def supervise_ranks(cfg: Config, overrides: List[str]) -> Optional[int]:
    """A multi-device run (hardware.gpus_per_node or hardware.processes > 1) started as
    one process becomes the supervisor of its torchrun ranks (finellama_rl.job.distributed);
    returns their exit code. None: this process trains itself (one device, or a rank)."""
    from finellama_rl.job import distributed as dist
    from finellama_rl.ladder.run_ladder import ladder_for

    if dist.is_worker():
        if not dist.is_main():
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress
        return None
    n = world_size(cfg.hardware)
    if n <= 1:
        return None
    if cfg.hardware.nodes != dist.nodes():
        raise ConfigError("hardware.nodes", f"hardware.nodes={cfg.hardware.nodes} runs one job on several nodes: submit it "
                          "with python -m finellama_rl.launch launcher=slurm (its job starts one supervisor per node)")
    if dist.node_rank() == 0:  # the first node makes the folder ours before any rank (or supervisor) writes into logs/
        _prepare_once(cfg)
    r = cfg.run
    pinned = [*overrides, f"run.dir={r.dir}", f"run.sweep={r.sweep}", f"run.name={r.name}", "run.resume=true"]
    restarts = 2 * len(ladder_for(cfg)) + 8 if cfg.ladder.enabled else 0  # list rungs plus generation-batch cuts
    per_node = processes_per_node(cfg.hardware)
    log.info("data parallel over %d processes (torchrun, %d node(s)); supervising node %d's", n, dist.nodes(), dist.node_rank())
    return dist.supervise(pinned, per_node, Path(r.dir), restarts, cuda=cfg.hardware.device == Device.cuda)


def main(argv: List[str]) -> int:
    multirun, overrides = split_argv(argv)
    if multirun:
        raise UsageError("finellama_rl.train runs one run; use finellama_rl.launch -m for sweeps")
    cfg = start_config(overrides)  # a run folder's own config.yaml when it resumes one
    setup_logging()
    if announce_finished(cfg):
        return 0
    check_resumable(cfg)
    supervised = supervise_ranks(cfg, overrides)
    if supervised is not None:
        return supervised
    try:
        code = run_training(cfg)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # saved and done: a late warning must not kill the exit
        return code
    except Exception as exc:  # a full disk: one line that says so, not a torch traceback
        if not is_disk_full(exc, Path(cfg.run.dir)):
            raise
        print(f"error: disk full (or quota exceeded) under {cfg.run.dir}: {str(exc).splitlines()[0][:300]}; "
              "files written before stay intact; free space and run the same command again to resume", flush=True)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main, overrides=True, multirun=False)
