"""Simulated comparison of OOM-recovery strategies (no GPU needed).

Why: the headline claim is that the memory planner + OOM ladder gets a run onto a
GPU with at most one failed attempt and without changing the experiment, where
hand resubmission costs a queue wait per failure. This script measures that claim
on a simulated memory model; every number in its tables is computed here.

Simulation:
- "True" peak memory of a setting = estimate_memory(...) * --error-factor (the
  planner underestimates by that factor; it is hidden from the planner). An attempt
  fits iff true peak <= card memory.
- Step time is proportional to tokens processed, plus a fixed cost per micro batch,
  times a recompute factor under activation checkpointing (cost model printed).
- An OOM attempt wastes the step's rollout share plus the first training micro
  batch (every micro batch has the same peak, so the first one fails), plus a
  restart: in-process for (a)-(c), a new SLURM job plus a queue wait for (d).

Run: python benchmarks/bench_ladder.py [--error-factor 1.12] [--queue-hours 4]
Exit status 1 if the planner-started ladder needs more than one failed attempt.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from finellama_rl.ladder.rungs import Setting, build_ladder  # noqa: E402
from finellama_rl.login.memory import (  # noqa: E402
    GIB, LORA_TARGETS, QWEN2_5_SHAPES, MemoryInputs, estimate_memory, plan_rung,
)

START = Setting(micro_batch=64, grad_accum=1, num_generations=1, max_prompt_tokens=256,
                max_completion_tokens=256, activation_checkpointing=False)
FLOOR_COMPLETION, FLOOR_PROMPT = 64, 128
GPUS = {"40 GB card": 40 * GIB, "80 GB card": 80 * GIB}
MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class CostModel:
    sec_per_ktoken: float = 0.5  # rollout + training compute per 1000 tokens of a step
    sec_per_micro_batch: float = 0.3  # launch + 4-bit dequantization per forward/backward
    checkpoint_factor: float = 4 / 3  # activation checkpointing recomputes the forward
    rollout_share: float = 0.5  # fraction of a step spent generating, before training
    in_process_retry_s: float = 10.0  # free cache, rebuild optimizer/dataloader
    job_start_s: float = 180.0  # new SLURM job: environment + model load
    queue_wait_h: float = 4.0  # per resubmission, reported separately


@dataclass
class Outcome:
    attempts: int
    ooms: int
    final: Optional[Setting]  # None: gave up
    wasted_s: float
    queue_h: float


def step_seconds(s: Setting, cost: CostModel) -> float:
    compute = s.effective_batch * s.max_seq_len / 1000 * cost.sec_per_ktoken
    if s.activation_checkpointing:
        compute *= cost.checkpoint_factor
    return compute + s.grad_accum * cost.sec_per_micro_batch


def oom_seconds(s: Setting, cost: CostModel) -> float:
    step = step_seconds(s, cost)
    return step * (cost.rollout_share + (1 - cost.rollout_share) / s.grad_accum)


def make_inputs(s: Setting) -> MemoryInputs:
    # As this project's PPO runs: dropout disabled (trainers/ppo.py disable_dropout), LM head
    # on completion positions only (trainers/value_head.py forward_completion), shared head.
    return MemoryInputs(shape=QWEN2_5_SHAPES["3B"], algo="ppo", setting=s, lora_r=16,
                        lora_target_modules=LORA_TARGETS, quantized=True, compute_bytes=2, beta=0.05,
                        lora_dropout=0.0, completion_logits_only=True)


def simulate(candidates: Iterator[Setting], fits: Callable[[Setting], bool], cost: CostModel,
             resubmit: bool) -> Outcome:
    out = Outcome(0, 0, None, 0.0, 0.0)
    for setting in candidates:
        out.attempts += 1
        if fits(setting):
            out.final = setting
            return out
        out.ooms += 1
        out.wasted_s += oom_seconds(setting, cost)
        out.wasted_s += cost.job_start_s if resubmit else cost.in_process_retry_s
        out.queue_h += cost.queue_wait_h if resubmit else 0.0
        if out.attempts >= MAX_ATTEMPTS:
            break
    return out


def accelerate_decay(start: Setting) -> Iterator[Setting]:
    """find_executable_batch_size: batch = int(batch * 0.9) per OOM, grad_accum unchanged
    (so the effective batch shrinks with it); gives up at 0."""
    batch = start.micro_batch
    while batch > 0:
        yield replace(start, micro_batch=batch)
        batch = int(batch * 0.9)


def manual_halving(start: Setting) -> Iterator[Setting]:
    """A researcher resubmitting: halve micro_batch (doubling grad_accum); at micro
    batch 1, halve both lengths (not below the floors) until nothing is left to cut."""
    s = start
    yield s
    while True:
        if s.micro_batch > 1:
            s = replace(s, micro_batch=s.micro_batch // 2, grad_accum=s.grad_accum * 2)
        elif s.max_completion_tokens > FLOOR_COMPLETION or s.max_prompt_tokens > FLOOR_PROMPT:
            s = replace(s, max_completion_tokens=max(FLOOR_COMPLETION, s.max_completion_tokens // 2),
                        max_prompt_tokens=max(FLOOR_PROMPT, s.max_prompt_tokens // 2))
        else:
            return
        yield s


def describe(s: Optional[Setting]) -> str:
    if s is None:
        return "gave up"
    return (f"{s.micro_batch}x{s.grad_accum}={s.effective_batch} seq {s.max_seq_len}"
            f" ckpt {'on' if s.activation_checkpointing else 'off'}")


def run_gpu(name: str, gpu_bytes: int, factor: float, margin: float, cost: CostModel) -> int:
    """Prints one table; returns the planner-started ladder's OOM count."""
    ladder = build_ladder(START, FLOOR_COMPLETION, FLOOR_PROMPT)
    true_peak = lambda s: estimate_memory(make_inputs(s)).peak_bytes * factor  # noqa: E731
    fits = lambda s: true_peak(s) <= gpu_bytes  # noqa: E731
    planned, est = plan_rung(ladder, make_inputs, gpu_bytes, margin)
    rows = [
        ("(a) ladder from planner rung", simulate((r.setting for r in ladder[planned:]), fits, cost, False)),
        ("(b) ladder from rung 0", simulate((r.setting for r in ladder), fits, cost, False)),
        ("(c) accelerate 0.9 decay", simulate(accelerate_decay(START), fits, cost, False)),
        ("(d) manual halving + resubmit", simulate(manual_halving(START), fits, cost, True)),
    ]
    print(f"\n== {name} ({gpu_bytes / GIB:.0f} GiB): planner picks rung {planned} "
          f"[{describe(ladder[planned].setting)}], predicted {est.peak_bytes / GIB:.1f} GiB, "
          f"true {true_peak(ladder[planned].setting) / GIB:.1f} GiB")
    header = (f"{'strategy':<31} {'attempts':>8} {'OOMs':>4}  {'final setting':<32} {'meaning':>7} "
              f"{'wasted GPU s':>12} {'queue h':>7} {'s/64 seq':>8}")
    print(header)
    print("-" * len(header))
    for label, o in rows:
        kept = o.final is not None and o.final.effective_batch == START.effective_batch \
            and o.final.max_seq_len == START.max_seq_len
        # Per START.effective_batch sequences, so a shrunken effective batch compares fairly.
        per = step_seconds(o.final, cost) * START.effective_batch / o.final.effective_batch if o.final else None
        step = f"{per:8.1f}" if per is not None else f"{'-':>8}"
        print(f"{label:<31} {o.attempts:>8} {o.ooms:>4}  {describe(o.final):<32} "
              f"{'kept' if kept else 'CHANGED':>7} {o.wasted_s:>12.1f} {o.queue_h:>7.1f} {step}")
    return rows[0][1].ooms if rows[0][1].final is not None else MAX_ATTEMPTS


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--error-factor", type=float, default=1.12,
                   help="true peak = planner estimate * factor (hidden from the planner)")
    p.add_argument("--margin", type=float, default=0.10, help="planner safety margin")
    p.add_argument("--queue-hours", type=float, default=CostModel.queue_wait_h)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cost = CostModel(queue_wait_h=args.queue_hours)
    print(f"Qwen2.5-3B PPO, 4-bit NF4 + LoRA r16 (all linears), start {describe(START)}, "
          f"floors completion {FLOOR_COMPLETION} / prompt {FLOOR_PROMPT}")
    print(f"hidden planner error factor: {args.error_factor} (true = estimate x factor); "
          f"planner margin {args.margin:.0%}")
    print(f"cost model: step = tokens/1000 x {cost.sec_per_ktoken}s (x{cost.checkpoint_factor:.2f} with "
          f"checkpointing) + {cost.sec_per_micro_batch}s per micro batch; an OOM wastes the rollout "
          f"({cost.rollout_share:.0%} of the step) + the first micro batch, plus "
          f"{cost.in_process_retry_s}s in-process retry or {cost.job_start_s}s job start + "
          f"{cost.queue_wait_h}h queue per resubmission")
    worst = max(run_gpu(name, size, args.error_factor, args.margin, cost) for name, size in GPUS.items())
    ok = worst <= 1
    print(f"\nplanner-started ladder: at most {worst} failed attempt(s) -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
