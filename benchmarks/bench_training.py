"""Benchmark of the training core (issue 10), on one run, printing measured numbers:

  A. GRPO adapter update size with and without the fp32 fix (TRL 1.16 casts the LoRA
     weights of a 4-bit model to bf16; finellama casts them back): the fraction of
     lora_A entries that never moved, and the norms of the updates.
  B. PPO rollout time per step before (one generate call per micro batch, as the seed
     and the first PPO did) and after batched generation (trainer.generation_batch=0).
  C. Our GRPO s/step against a plain TRL GRPOTrainer script at identical settings
     (same 4-bit base, LoRA, GRPOConfig, data, reward), paired and interleaved, two model
     sizes; plain TRL both as shipped (bf16 LoRA) and with the same fp32 cast (the
     overhead comparison). Target: ours <= 1.02x plain.
  D. PPO against GRPO at equal tokens per step (PPO prompts = GRPO prompts x group),
     ppo.epochs 1 and 2. Target: <= 1.3x. Each trainer's defaults differ in what a step
     computes: GRPO's beta = 0 runs no reference pass, PPO's kl_coef = 0.05 does (and PPO
     also scores the rollout for values and old log-probs, which GRPO with
     num_iterations = 1 never needs). So D also times two matched pairs: no KL in either
     (ppo.kl_coef=0 vs GRPO beta=0) and KL in both (ppo.kl_coef=0.05 vs GRPO beta=0.05).

    .venv/bin/python benchmarks/bench_training.py                 # all parts, CPU (~30 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_training.py --parts C --repeat 5
    .venv/bin/python benchmarks/bench_training.py --parts CD --baseline /tmp/old   # + arms on an older checkout

--baseline DIR (a copy of the repository, e.g. `git archive <commit> | tar -x -C DIR`)
adds paired arms that run DIR's finellama_rl (first on PYTHONPATH) with this script:
C's `ours` and D's PPO arms, for before/after figures of the same run.

Timing: every timed arm runs in its own subprocess with one thread (spin-waiting
OpenMP threads make timings swing 10x on a shared machine), arms interleaved in a
rotating order within each repeat, s/step = median of steps 2..N (step 1 includes
warm-up); ratios are per repeat (paired) and the median and range are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
SHAPES = {"tiny": [], "256x4": ["model.hidden_size=256", "model.num_layers=4", "model.intermediate_size=512",
                                "model.num_attention_heads=4", "model.num_kv_heads=2"]}
BASE = ["experiment=smoke", "model=tiny", "data=arithmetic", "hardware=cpu", "eval.protocol=finellama",
        "data.num_train=256", "trainer.save_every=100000", "trainer.log_every=1", "trainer.warmup_steps=0",
        "trainer.lr_schedule=constant", "trainer.max_prompt_tokens=128", "ladder.enabled=false"]


def alternating_reward(completions, **kw):
    """Rewards with variance whatever a random model writes (non-zero advantages)."""
    return [float(i % 2) for i in range(len(completions))]


def build_ctx(cfg):
    from finellama_rl.trainers.base import bare_context

    return bare_context(cfg, [alternating_reward], label="bench")


def _config(overrides, tmp):
    from finellama_rl.compose import load_config

    return load_config([*BASE, *overrides, f"run.results_dir={tmp}", f"run.dir={tmp}/run"])


# --------------------------------------------------------------------- workers


def worker_step_time(arm: str, overrides: list) -> dict:
    """s/step of one arm: ours (grpo/ppo through our trainers), plain (TRL as shipped),
    plain_fp32 (TRL with the same fp32 cast)."""
    from finellama_rl.fileio import read_jsonl

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        cfg = _config(overrides, tmp)
        ctx = build_ctx(cfg)
        if arm == "ours":
            from finellama_rl.trainers.run import algorithm

            cpu, log = [time.process_time()], ctx.monitor.log  # the metrics line closes each step

            def timed_log(*a, **kw):
                cpu.append(time.process_time())
                return log(*a, **kw)

            ctx.monitor.log = timed_log
            algorithm(cfg.trainer.algo)(ctx)
            sps = [r["perf/sec_per_step"] for r in read_jsonl(ctx.paths.metrics)][1:]
            cps = [b - a for a, b in zip(cpu, cpu[1:])][1:]
        else:
            sps, cps = _plain_trl(ctx, fp32=arm == "plain_fp32")
            sps, cps = sps[1:], cps[1:]
    return {"s_per_step": statistics.median(sps), "cpu_s_per_step": statistics.median(cps), "steps": len(sps) + 1}


def _plain_trl(ctx, fp32: bool) -> list:
    """A plain TRL GRPOTrainer script: the same model, GRPOConfig, data and reward."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from finellama_rl.trainers.grpo import build_grpo_config, keep_trainable_fp32

    times, cpu = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.monotonic())
            cpu.append(time.process_time())

    trainer = GRPOTrainer(model=ctx.policy, reward_funcs=[alternating_reward],
                          args=build_grpo_config(ctx.cfg, ctx.paths.checkpoints / ".staging"),
                          train_dataset=Dataset.from_list(ctx.train_rows), processing_class=ctx.tokenizer,
                          callbacks=[Clock()])
    if fp32:
        keep_trainable_fp32(trainer.model)
    t0, c0 = time.monotonic(), time.process_time()
    trainer.train()
    wall, proc = [t0] + times, [c0] + cpu
    return [b - a for a, b in zip(wall, wall[1:])], [b - a for a, b in zip(proc, proc[1:])]


def worker_fp32(overrides: list) -> dict:
    """Part A in one process: GRPO at lr 1e-5 with and without the cast back to fp32."""
    import torch

    from finellama_rl.trainers import grpo

    out = {}
    for arm in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory(prefix="bench-fp32-") as tmp:
            ctx = build_ctx(_config(overrides, tmp))
            original = grpo.keep_trainable_fp32
            if arm == "bf16":
                grpo.keep_trainable_fp32 = lambda model: 0  # TRL as shipped
            try:
                trainer, _ = grpo.build_trainer(ctx)
            finally:
                grpo.keep_trainable_fp32 = original
            named = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
            start = {n: p.detach().float().clone() for n, p in named.items()}
            trainer.train()
            a = [(named[n].detach().float(), start[n]) for n in named if "lora_A" in n]
            b = [named[n].detach().float() for n in named if "lora_B" in n]
            frozen = sum(int((p == s).sum()) for p, s in a) / sum(p.numel() for p, _ in a)
            out[arm] = {"dtype": str(next(iter(named.values())).dtype), "lora_A_unchanged": frozen,
                        "lora_A_update_norm": float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in a))),
                        "lora_B_norm": float(torch.sqrt(sum((p ** 2).sum() for p in b))),
                        "lora_B_max": float(max(p.abs().max() for p in b))}
    return out


def worker_rollout(overrides: list, generation_batch: int, repeats: int) -> dict:
    """Part B: PPO collect_rollout (generation + scoring) per step at a generation batch."""
    from dataclasses import replace

    from finellama_rl.trainers import ppo
    from finellama_rl.trainers.ppo_rollout import RolloutEnv, collect_rollout, rows_for_step

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        cfg = _config(overrides, tmp)
        ctx = build_ctx(cfg)
        t = replace(cfg.trainer, generation_batch=generation_batch)
        state = ppo.build_state(ctx.policy, t)
        times = []
        for step in range(1, repeats + 2):
            rows = rows_for_step(ctx.train_rows, step, t.prompts_per_step, t.seed)
            t0 = time.monotonic()
            collect_rollout(state.policy, ctx.tokenizer, state.critic, state.reference, rows, ctx.reward_funcs, t,
                            RolloutEnv(step=step))
            times.append(time.monotonic() - t0)
    return {"s_per_rollout": statistics.median(times[1:])}


def run_worker(kind: str, payload: dict, code: str | None = None) -> dict:
    """One worker subprocess; `code`: a repository copy whose finellama_rl it imports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, __file__, "--worker", kind, "--payload", json.dumps(payload)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if code and f"FINELLAMA_FROM {Path(code).resolve()}" not in proc.stdout:
        raise RuntimeError(f"worker {kind} did not import finellama_rl from {code}:\n{proc.stdout[-2000:]}")
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {kind} {payload} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# ---------------------------------------------------------------------- parts


def _spread(values):
    return f"median {statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, n={len(values)})"


def part_a(args):
    grpo = ["trainer=grpo", "trainer.prompts_per_step=4", "trainer.num_generations=4", "trainer.micro_batch=8",
            "trainer.max_completion_tokens=16", "trainer.learning_rate=1e-5", f"trainer.max_steps={args.fp32_steps}",
            *SHAPES["256x4"]]
    r = run_worker("fp32", {"overrides": grpo})
    print(f"\nA. GRPO adapter update, 4-bit 256x4 model, LoRA r=16, AdamW lr 1e-5, {args.fp32_steps} steps")
    print(f"{'arm':<28} {'dtype':<15} {'lora_A unchanged':>17} {'|dA|':>10} {'|B|':>10} {'max|B|':>10}")
    for arm, label in (("bf16", "TRL as shipped (bf16 cast)"), ("fp32", "finellama (cast back)")):
        x = r[arm]
        print(f"{label:<28} {x['dtype']:<15} {x['lora_A_unchanged']:>16.1%} {x['lora_A_update_norm']:>10.3e} "
              f"{x['lora_B_norm']:>10.3e} {x['lora_B_max']:>10.3e}")
    return r


def part_b(args):
    ppo = ["trainer=ppo", "trainer.prompts_per_step=32", "trainer.micro_batch=4", "trainer.max_completion_tokens=32",
           *SHAPES["256x4"]]
    times = {4: [], 0: []}
    for rep in range(args.repeat):
        for gen in ((4, 0) if rep % 2 == 0 else (0, 4)):
            times[gen].append(run_worker("rollout", {"overrides": ppo, "generation_batch": gen, "repeats": 3})["s_per_rollout"])
    ratios = [b / a for a, b in zip(times[0], times[4])]
    print("\nB. PPO rollout (generation + scoring) per step, 256x4 model, 32 prompts x 32 new tokens, micro batch 4")
    print(f"   before (one generate call per micro batch, 8 calls): {_spread(times[4])} s")
    print(f"   after  (trainer.generation_batch=0, one call):       {_spread(times[0])} s")
    print(f"   speed-up: {_spread(ratios)}x")
    return {"before": times[4], "after": times[0], "speedup": ratios}


def _paired(arms, overrides_of, shapes, repeats):
    """({shape: {arm: [wall s/step per repeat]}}, the same in CPU seconds of the training
    process), arms interleaved in a rotating order. overrides_of(arm, shape) -> (worker
    arm, overrides[, code folder])."""
    out = {s: {a: [] for a in arms} for s in shapes}
    cpu = {s: {a: [] for a in arms} for s in shapes}
    for rep in range(repeats):
        for shape in shapes:
            order = arms[rep % len(arms):] + arms[:rep % len(arms)]
            for arm in order:
                worker_arm, overrides, *code = overrides_of(arm, shape)
                r = run_worker("step_time", {"arm": worker_arm, "overrides": overrides}, *code)
                out[shape][arm].append(r["s_per_step"])
                cpu[shape][arm].append(r["cpu_s_per_step"])
                print(f"   [{shape} {arm} rep {rep}] {r['s_per_step']:.3f} s/step, {r['cpu_s_per_step']:.3f} CPU s/step",
                      file=sys.stderr, flush=True)
    return out, cpu


def part_c(args):
    grpo = ["trainer=grpo", "trainer.prompts_per_step=4", "trainer.num_generations=4", "trainer.micro_batch=8",
            "trainer.max_completion_tokens=24", f"trainer.max_steps={args.steps}"]
    arms = ["ours", "plain_fp32", "plain"] + (["ours_baseline"] if args.baseline else [])

    def overrides(arm, shape):
        if arm == "ours_baseline":
            return "ours", [*grpo, *SHAPES[shape]], args.baseline
        return arm, [*grpo, *SHAPES[shape]]

    res, cpu = _paired(arms, overrides, list(SHAPES), args.repeat)
    print(f"\nC. GRPO s/step, ours vs a plain TRL GRPOTrainer script, identical settings "
          f"(4 prompts x 4, micro 8, <=24 new tokens, {args.steps} steps, 1 thread)")
    for shape, r in cpu.items():  # CPU seconds of the training process: robust to other processes' load
        over = [o / p for o, p in zip(r["ours"], r["plain_fp32"])]
        print(f"   {shape} CPU s/step: ours {_spread(r['ours'])}; plain fp32 {_spread(r['plain_fp32'])}; "
              f"ours / plain fp32 = {_spread(over)}x (target <= 1.02)")
        if args.baseline:
            base = [o / p for o, p in zip(r["ours_baseline"], r["plain_fp32"])]
            print(f"   {shape} CPU s/step: baseline {_spread(r['ours_baseline'])}; baseline / plain fp32 = {_spread(base)}x; "
                  f"ours / baseline = {_spread([o / b for o, b in zip(r['ours'], r['ours_baseline'])])}x")
    for shape, r in res.items():
        print(f"   {shape}: ours {_spread(r['ours'])}; plain fp32 {_spread(r['plain_fp32'])}; plain bf16 {_spread(r['plain'])}")
        over = [o / p for o, p in zip(r["ours"], r["plain_fp32"])]
        ship = [o / p for o, p in zip(r["ours"], r["plain"])]
        print(f"   {shape}: ours / plain TRL with fp32 LoRA = {_spread(over)}x (target <= 1.02); "
              f"ours / plain TRL as shipped = {_spread(ship)}x")
    return {"wall": res, "cpu": cpu}


def part_d(args):
    g, prompts = 4, 4
    common = ["trainer.micro_batch=8", "trainer.max_completion_tokens=24", f"trainer.max_steps={args.steps}"]
    ppo_arms = {"ppo_e1": ["trainer.ppo.epochs=1"], "ppo_e2": ["trainer.ppo.epochs=2"],
                "ppo_e1_nokl": ["trainer.ppo.epochs=1", "trainer.ppo.kl_coef=0"]}
    grpo_arms = {"grpo": [], "grpo_kl": ["trainer.beta=0.05"]}  # PPO's default kl_coef
    arms = [*grpo_arms, *ppo_arms] + [f"{a}_baseline" for a in ppo_arms if args.baseline]

    def overrides(arm, shape):
        if arm in grpo_arms:
            return "ours", ["trainer=grpo", f"trainer.prompts_per_step={prompts}", f"trainer.num_generations={g}",
                            *grpo_arms[arm], *common, *SHAPES[shape]]
        name = arm.removesuffix("_baseline")
        return ("ours", ["trainer=ppo", f"trainer.prompts_per_step={prompts * g}", *ppo_arms[name], *common,
                         *SHAPES[shape]], *([args.baseline] if arm.endswith("_baseline") else []))

    res, cpu = _paired(arms, overrides, list(SHAPES), args.repeat)
    print(f"\nD. PPO vs GRPO at equal tokens per step ({prompts * g} completions of <= 24 tokens, micro 8, 1 thread)")
    for shape, r in res.items():
        for arm in ("ppo_e1", "ppo_e2"):
            ratio = [p / q for p, q in zip(r[arm], r["grpo"])]
            print(f"   {shape}: {arm} {_spread(r[arm])} s/step vs grpo {_spread(r['grpo'])}: {_spread(ratio)}x (target <= 1.3)")
    pairs = [("ppo_e1", "grpo", "defaults, 1 epoch"), ("ppo_e2", "grpo", "defaults"),
             ("ppo_e1_nokl", "grpo", "no KL in either"), ("ppo_e1", "grpo_kl", "KL in both")]
    pairs += [(f"{a}_baseline", b, f"{what}, baseline code") for a, b, what in pairs[:3] if args.baseline]
    for shape, r in cpu.items():
        for arm in arms:
            print(f"   {shape} CPU s/step {arm}: {_spread(r[arm])}")
        for a, b, what in pairs:
            print(f"   {shape} CPU s/step: {a} / {b} ({what}) = {_spread([p / q for p, q in zip(r[a], r[b])])}x (target <= 1.3)")
        for a in ppo_arms if args.baseline else ():
            print(f"   {shape} CPU s/step: {a} / {a}_baseline = {_spread([p / q for p, q in zip(r[a], r[a + '_baseline'])])}x")
    return {"wall": res, "cpu": cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="ABCD")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--fp32-steps", type=int, default=30)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--baseline", default=None, help="a repository copy to time as extra arms (before/after)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        kw = json.loads(args.payload)
        import finellama_rl

        print("FINELLAMA_FROM", Path(finellama_rl.__file__).resolve().parent.parent, flush=True)
        fn = {"step_time": lambda: worker_step_time(kw["arm"], kw["overrides"]),
              "fp32": lambda: worker_fp32(kw["overrides"]),
              "rollout": lambda: worker_rollout(kw["overrides"], kw["generation_batch"], kw["repeats"])}[args.worker]
        print(RESULT_TAG + json.dumps(fn()), flush=True)
        return 0
    print(f"bench_training: {time.strftime('%Y-%m-%d %H:%M')}, CPU, {os.cpu_count()} cores (shared machine), "
          f"repeat={args.repeat}")
    raw = {}
    for part, fn in (("A", part_a), ("B", part_b), ("C", part_c), ("D", part_d)):
        if part in args.parts:
            raw[part] = fn(args)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
