"""The four measurements of benchmarks/gpu_check.py, each through the project's own code:

1. planner: the planner's peak (login.planner.memory_inputs -> login.memory.estimate_memory) against the
   peak CUDA memory of 2 real steps (trainers.run.algorithm with a TrainContext, as train_attempt
   builds it), per phase, for every model x algorithm x micro batch x length;
2. ladder: finellama_rl.trainers.run.run_training from the seed's too-large start on a capped card
   (GPU: set_per_process_memory_fraction; dry: debug.oom_above_tokens), with and without
   the planner's start rung (login.planner.choose_start_rung, what launch uses);
3. overhead: GRPO through finellama_rl against plain TRL (gpu_check_trl.py), and PPO
   against GRPO at equal sequences and tokens per step;
4. generation: tokens/s of PPO's sampler (ppo_rollout.generate_rollout: HF generate on
   the 4-bit policy with explicit decoding) at the presets' rollout sizes.

Each section appends its records to `results` and calls `save()` after every piece, and
asks `clock.allows(...)` before each piece (pieces already in `results`, e.g. from
--merge, are kept and not run again).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List

from gpu_check_setup import GIB, Clock, Workspace, free_cuda, gib, median, outside_allocator_bytes, peak_tracker


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(cfg):
    from finellama_rl.job.model import load_policy, load_tokenizer

    return load_policy(cfg.model, cfg.trainer, cfg.hardware), load_tokenizer(cfg.model)


def train_rows(cfg, tokenizer) -> List[Dict[str, str]]:
    from finellama_rl.task.data import load_problems, with_prompts
    from finellama_rl.task.protocols import prompt_format

    rows, _ = with_prompts(load_problems(cfg.data, "train"), tokenizer,
                           prompt_format(cfg.eval.protocol, cfg.data.system_prompt), cfg.trainer.max_prompt_tokens)
    return rows


def train_with(cfg, policy, tokenizer, tracker) -> Dict[str, Any]:
    """cfg.trainer.max_steps steps of cfg's algorithm on a loaded policy, through the project's
    trainer and the context train_attempt builds (no evaluation)."""
    import transformers

    from finellama_rl.job.monitor import TrainingMonitor
    from finellama_rl.results import RunPaths
    from finellama_rl.fileio import read_jsonl
    from finellama_rl.rewards.sources import build_reward_sources
    from finellama_rl.trainers.run import algorithm
    from finellama_rl.trainers.base import TrainContext

    transformers.set_seed(cfg.trainer.seed)
    paths = RunPaths(Path(cfg.run.dir)).make()
    monitor = TrainingMonitor(cfg.trainer, paths, 0, "gpu_check", print_fn=lambda s: None)
    ctx = TrainContext(cfg=cfg, paths=paths, policy=policy, tokenizer=tokenizer, train_rows=train_rows(cfg, tokenizer),
                       reward_funcs=build_reward_sources(cfg), monitor=monitor, evaluate=lambda m, s: None, tracker=tracker)
    t0 = time.perf_counter()
    algorithm(cfg.trainer.algo)(ctx)
    _sync()
    records = read_jsonl(paths.metrics)
    return {"wall_s": round(time.perf_counter() - t0, 2), "steps": [r["step"] for r in records],
            "sec_per_step": [round(r["perf/sec_per_step"], 4) for r in records]}


class Pieces:
    """Skip-or-run bookkeeping of one section: ids already done, the clock, the last duration;
    a piece that raises is recorded in results["errors"] and the section goes on."""

    def __init__(self, results: Dict[str, Any], key: str, clock: Clock, save: Callable[[], None]):
        self.key = key
        self.out = results.setdefault(key, {})
        self.items = self.out.setdefault("items", [])
        self.skipped = self.out.setdefault("skipped", [])
        self.errors = results.setdefault("errors", [])
        self.done = {r["id"] for r in self.items}
        self.clock, self.save, self.last = clock, save, 0.0

    def attempt(self, piece_id: str, measure: Callable[[], Dict[str, Any]]) -> None:
        """Run `measure` for `piece_id` if wanted; keep its record, or its error."""
        if not self.want(piece_id):
            return
        started = time.monotonic()
        try:
            record = measure()
        except Exception as exc:  # noqa: BLE001 - one piece's failure must not lose the others
            traceback.print_exc()
            self.last = time.monotonic() - started
            self.errors.append({"section": self.key, "piece": piece_id, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            del exc
            free_cuda()
            self.save()
            return
        self.add({"id": piece_id, **record}, started)

    def want(self, piece_id: str) -> bool:
        if piece_id in self.done:
            return False
        if not self.clock.allows(self.last):
            self.skipped.append(piece_id)
            self.save()
            return False
        return True

    def add(self, record: Dict[str, Any], started: float) -> None:
        self.last = time.monotonic() - started
        record["wall_s"] = round(self.last, 2)
        self.items.append(record)
        self.done.add(record["id"])
        self.save()


# ------------------------------------------------------------------------------ 1. planner


def _prediction(cfg) -> Dict[str, Any]:
    from finellama_rl.login import memory
    from finellama_rl.login.planner import memory_inputs
    from finellama_rl.ladder.run_ladder import setting_of

    est = memory.estimate_memory(memory_inputs(cfg, setting_of(cfg.trainer, cfg.hardware)))
    static = sum(est.components.get(k, 0) for k in getattr(memory, "STATIC", ()))
    phases = {p: gib(static + sum(est.components.get(k, 0) for k in keys))
              for p, keys in getattr(memory, "PHASES", {}).items()}
    overhead = est.components.get(getattr(memory, "OVERHEAD", "cuda_context_and_overhead"), 0)
    return {"peak": est.peak_bytes, "overhead": overhead, "phase": est.phase, "phase_totals_gib": phases,
            "components_gib": {k: gib(v) for k, v in est.components.items()}}


def planner_cell(cfg, policy, tokenizer) -> Dict[str, Any]:
    import torch

    free_cuda()
    outside = outside_allocator_bytes()
    at_start = torch.cuda.memory_allocated() if torch.cuda.is_available() else None  # the loaded policy
    tracker = peak_tracker()
    run = train_with(cfg, policy, tokenizer, tracker)
    measured = tracker.summary()
    pred = _prediction(cfg)
    t = cfg.trainer
    record = {"micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "prompt": t.max_prompt_tokens,
              "completion": t.max_completion_tokens, "sequences_per_step": t.prompts_per_step * t.num_generations,
              "steps": run["steps"], "predicted_gib": gib(pred["peak"]), "predicted_phase": pred["phase"],
              "predicted_phase_totals_gib": pred["phase_totals_gib"], "predicted_components_gib": pred["components_gib"],
              "allocated_gib": measured["allocated_gib"], "reserved_gib": measured["reserved_gib"],
              "outside_allocator_gib": gib(outside), "allocated_at_start_gib": gib(at_start),
              "measured_phases": measured["phases"]}
    if measured["allocated_gib"]:
        # the planner's peak includes its allowance for the CUDA context and allocator slack:
        # compare it with reserved + what lies outside the allocator; its tensors alone with allocated
        record["ratio_vs_reserved"] = round(pred["peak"] / (measured["reserved_gib"] * GIB + (outside or 0)), 3)
        record["ratio_vs_allocated"] = round((pred["peak"] - pred["overhead"]) / (measured["allocated_gib"] * GIB), 3)
        record["within_10pct"] = abs(record["ratio_vs_reserved"] - 1) <= 0.10
    return record


def planner_section(ws: Workspace, clock: Clock, results: Dict[str, Any], save) -> None:
    p = ws.profile
    pieces = Pieces(results, "planner", clock, save)
    for model in p.models:
        for algo in ("ppo", "grpo"):
            loaded: Dict[str, Any] = {}  # one load per model and algorithm; every cell trains it afresh
            batch = ([f"trainer.prompts_per_step={p.planner_grpo[0]}", f"trainer.num_generations={p.planner_grpo[1]}"]
                     if algo == "grpo" else [f"trainer.prompts_per_step={p.planner_ppo_prompts}", "trainer.ppo.epochs=1"])
            for prompt, completion in p.planner_lengths:
                for mb in p.planner_micro_batches:
                    def measure(model=model, algo=algo, prompt=prompt, completion=completion, mb=mb):
                        cfg = ws.config(model, algo, prompt, completion,
                                        [*batch, f"trainer.micro_batch={mb}", f"trainer.max_steps={p.planner_steps}"])
                        if not loaded:
                            loaded["policy"], loaded["tokenizer"] = load(cfg)
                        return {"model": model, "algo": algo, **planner_cell(cfg, loaded["policy"], loaded["tokenizer"])}

                    pieces.attempt(f"{model}/{algo}/mb{mb}/seq{prompt}+{completion}", measure)
            loaded.clear()
            free_cuda()


# ------------------------------------------------------------------------------ 2. ladder


def _cap(gib_cap: float) -> float:
    """Cap PyTorch's allocator so that allocator + outside-allocator memory fit `gib_cap` GiB."""
    import torch

    free_cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = max(0.01, min(1.0, (gib_cap * GIB - (outside_allocator_bytes() or 0)) / total))
    torch.cuda.set_per_process_memory_fraction(fraction)
    return round(fraction, 4)


def _attempt_row(a: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("attempt", "rung", "micro_batch", "grad_accum", "generation_batch", "max_prompt_tokens",
            "max_completion_tokens", "activation_checkpointing", "outcome", "phase", "steps_done", "wall_time_s",
            "peak_gpu_mem_gb")
    row = {k: a.get(k) for k in keys}
    row["error"] = str(a.get("error") or "")[:160]
    return row


def summarize_attempts(attempts: List[Dict[str, Any]], steps: List[int], max_steps: int, discarded: bool) -> Dict[str, Any]:
    """Attempts, OOMs (real CUDA ones apart), seconds spent before the first rung that fitted,
    the final rung, and whether every step was trained (logged) exactly once."""
    first_fit = next((i for i, a in enumerate(attempts) if a.get("steps_done") or a["outcome"] == "completed"), None)
    wasted = attempts if first_fit is None else attempts[:first_fit]
    final = attempts[-1] if attempts else {}
    return {"attempts": len(attempts), "ooms": sum(a["outcome"] == "oom" for a in attempts),
            "real_cuda_ooms": sum("CUDA out of memory" in str(a.get("error", "")) for a in attempts),
            "simulated_ooms": sum("simulated out of memory" in str(a.get("error", "")) for a in attempts),
            "wasted_s": round(sum(a.get("wall_time_s") or 0.0 for a in wasted), 2),
            "final_rung": final.get("rung"), "final_setting": {k: final.get(k) for k in (
                "micro_batch", "grad_accum", "generation_batch", "max_prompt_tokens", "max_completion_tokens",
                "activation_checkpointing")},
            "steps": steps, "every_step_once": steps == list(range(1, max_steps + 1)) and not discarded}


def ladder_case(ws: Workspace, cap, planner: bool) -> Dict[str, Any]:
    import torch

    from finellama_rl.ladder.attempts import read_attempts
    from finellama_rl.login.memory import estimate_memory
    from finellama_rl.login.planner import choose_start_rung, memory_inputs
    from finellama_rl.results import RunPaths
    from finellama_rl.fileio import read_jsonl
    from finellama_rl.ladder.run_ladder import ladder_for
    from finellama_rl.trainers.run import run_training

    p = ws.profile
    prompts, mb, prompt, completion = p.ladder_start
    overrides = [f"trainer.prompts_per_step={prompts}", f"trainer.micro_batch={mb}", f"trainer.max_steps={p.ladder_steps}"]
    if cap.oom_above_tokens is not None:
        overrides.append(f"debug.oom_above_tokens={cap.oom_above_tokens}")
    gpu = torch.cuda.is_available()
    cfg = ws.config(p.ladder_model, "ppo", prompt, completion, overrides, hardware=cap.plan_hardware if gpu else None)
    start, why = 0, "start (no planner)"
    if planner:  # what launch does: fit memory (none here) > planner for the card's profile
        plan_cfg = cfg if gpu else ws.config(p.ladder_model, "ppo", prompt, completion, overrides, hardware=cap.plan_hardware)
        start, why = choose_start_rung(plan_cfg)
        cfg = replace(cfg, ladder=replace(cfg.ladder, start_rung=start))
    ladder = ladder_for(cfg)
    planned = [gib(estimate_memory(memory_inputs(cfg, r.setting)).peak_bytes) for r in ladder]
    fraction = _cap(cap.gib) if gpu else None
    started = time.monotonic()
    try:
        code = run_training(cfg)
    finally:
        if gpu:
            torch.cuda.set_per_process_memory_fraction(1.0)
        free_cuda()
    paths = RunPaths(Path(cfg.run.dir))
    attempts = read_attempts(paths)
    steps = [r["step"] for r in read_jsonl(paths.metrics)]
    discarded = paths.metrics.with_name("metrics_discarded.jsonl").exists()
    return {"cap": cap.label, "start": f"{p.ladder_model} ppo, {prompts} prompts, micro batch {mb}, sequence "
            f"{prompt}+{completion}", "memory_fraction": fraction, "planner": planner, "start_rung": start, "start_why": why,
            "exit_code": code, "run_s": round(time.monotonic() - started, 2), "predicted_gib_by_rung": planned,
            **summarize_attempts(attempts, steps, cfg.trainer.max_steps, discarded),
            "attempt_rows": [_attempt_row(a) for a in attempts]}


def ladder_section(ws: Workspace, clock: Clock, results: Dict[str, Any], save) -> None:
    pieces = Pieces(results, "ladder", clock, save)
    for index, planner in ws.profile.ladder_cases:
        cap = ws.profile.ladder_caps[index]
        pieces.attempt(f"{cap.label}/{'planner' if planner else 'no planner'}",
                       lambda cap=cap, planner=planner: ladder_case(ws, cap, planner))


# ------------------------------------------------------------------------------ 3. overhead


def _project_run(cfg) -> Dict[str, Any]:
    policy, tokenizer = load(cfg)
    free_cuda()
    tracker = peak_tracker()
    run = train_with(cfg, policy, tokenizer, tracker)
    measured = tracker.summary()
    del policy
    free_cuda()
    return {**run, "allocated_gib": measured["allocated_gib"], "reserved_gib": measured["reserved_gib"]}


def _plain_run(cfg) -> Dict[str, Any]:
    from gpu_check_trl import plain_trl_grpo

    from finellama_rl.job.model import load_tokenizer
    from finellama_rl.rewards.sources import build_reward_sources

    rows = train_rows(cfg, load_tokenizer(cfg.model))
    free_cuda()
    out = plain_trl_grpo(cfg, rows, build_reward_sources(cfg), Path(cfg.run.dir) / "plain_trl")
    free_cuda()
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def overhead_section(ws: Workspace, clock: Clock, results: Dict[str, Any], save) -> None:
    p = ws.profile
    prompts, generations, mb = p.overhead_grpo
    prompt, completion = p.overhead_lengths
    common = [f"trainer.micro_batch={mb}", f"trainer.max_steps={p.overhead_steps}"]
    configs = {
        "finellama_grpo": lambda: ws.config(p.overhead_model, "grpo", prompt, completion, [
            f"trainer.prompts_per_step={prompts}", f"trainer.num_generations={generations}", *common]),
        "plain_trl_grpo": lambda: ws.config(p.overhead_model, "grpo", prompt, completion, [
            f"trainer.prompts_per_step={prompts}", f"trainer.num_generations={generations}", *common]),
        "finellama_ppo": lambda: ws.config(p.overhead_model, "ppo", prompt, completion, [
            f"trainer.prompts_per_step={prompts * generations}", *common]),
    }
    pieces = Pieces(results, "overhead", clock, save)
    for name, make in configs.items():
        def measure(name=name, make=make):
            cfg = make()
            run = _plain_run(cfg) if name == "plain_trl_grpo" else _project_run(cfg)
            run["median_s"] = median(run["sec_per_step"][1:] or run["sec_per_step"])  # step 1 is warm-up
            return {"model": p.overhead_model, "sequences_per_step": prompts * generations,
                    "tokens_per_step": prompts * generations * (prompt + completion), "micro_batch": mb, **run}

        pieces.attempt(name, measure)
    runs = {r["id"]: r for r in pieces.items}
    f, t, o = runs.get("finellama_grpo", {}), runs.get("plain_trl_grpo", {}), runs.get("finellama_ppo", {})
    pieces.out["ratios"] = {
        "grpo_time_finellama_over_trl": _ratio(f.get("median_s"), t.get("median_s")),
        "grpo_memory_finellama_over_trl": _ratio(f.get("allocated_gib"), t.get("allocated_gib")),
        "time_ppo_over_grpo": _ratio(o.get("median_s"), f.get("median_s")),
        "memory_ppo_over_grpo": _ratio(o.get("allocated_gib"), f.get("allocated_gib"))}
    save()


# ------------------------------------------------------------------------------ 4. generation


def generation_section(ws: Workspace, clock: Clock, results: Dict[str, Any], save) -> None:
    import torch

    from finellama_rl.config import Device
    from finellama_rl.rewards.sources import build_reward_sources
    from finellama_rl.trainers.ppo_rollout import RolloutEnv, generate_rollout

    p = ws.profile
    prompt, new_tokens = p.generation_lengths
    pieces = Pieces(results, "generation", clock, save)
    for model in p.generation_models:
        loaded: Dict[str, Any] = {}  # one load and one warm-up generate call per model
        for batch in p.generation_batches:
            def measure(model=model, batch=batch):
                if not loaded:
                    cfg = ws.config(model, "ppo", prompt, new_tokens, [f"trainer.prompts_per_step={max(p.generation_batches)}"])
                    policy, tokenizer = load(cfg)
                    rows, rewards = train_rows(cfg, tokenizer), build_reward_sources(cfg)
                    env = RolloutEnv(step=1, amp=cfg.hardware.bf16 and cfg.hardware.device == Device.cuda)
                    generate_rollout(policy, tokenizer, rows[:2], rewards, replace(cfg.trainer, max_completion_tokens=4), env)
                    loaded.update(cfg=cfg, policy=policy, tokenizer=tokenizer, rows=rows, rewards=rewards, env=env)
                free_cuda()
                t0 = time.perf_counter()
                roll = generate_rollout(loaded["policy"], loaded["tokenizer"], loaded["rows"][:batch], loaded["rewards"],
                                        loaded["cfg"].trainer, loaded["env"])
                _sync()
                seconds = time.perf_counter() - t0
                tokens = int(roll.mask.sum())
                return {"model": model, "batch": batch, "prompt": prompt, "max_new_tokens": new_tokens,
                        "new_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                        "allocated_gib": gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None}

            pieces.attempt(f"{model}/batch{batch}", measure)
        loaded.clear()
        free_cuda()


SECTIONS = {"planner": planner_section, "ladder": ladder_section, "overhead": overhead_section,
            "generation": generation_section}
