"""Benchmark: peak memory and time per step of PPO vs GRPO at the same micro batch,
sequences per step and lengths, on a random-init Qwen2 model (4-bit base + LoRA,
the production path). Each (model, algorithm) runs in its own subprocess so that
one run's allocations never count towards another's peak.

Why: PPO adds a critic and a reference pass on the SAME base; this checks that it
stays within 1.5x of GRPO's peak (asserted), and records s/step for docs/LOG.md.

    .venv/bin/python benchmarks/bench_ppo_grpo.py                       # CPU: tiny and 256x4
    .venv/bin/python benchmarks/bench_ppo_grpo.py --device cuda --random-init-shape qwen2.5-0.5b

Memory: on CPU the growth of the resident set's high-water mark over the RSS
after the model is loaded (/proc/self/clear_refs resets the mark). The memory
run of each row uses MALLOC_MMAP_THRESHOLD_=65536 so that every tensor buffer is
its own mapping, returned to the OS when freed: the mark then follows live
memory, not glibc's heap fragmentation (without it the same step read anywhere
from 1x to 2x). That setting costs time (a page fault per fresh buffer), so time
comes from separate runs with the default allocator. On CUDA (one run does both):
torch.cuda.max_memory_allocated() minus the allocation before training.
Time: median perf/sec_per_step of steps 2..N (step 1 includes warm-up), then the
minimum over --repeat runs; on a shared CPU, spin-waiting OpenMP threads make
timings swing 10x under load, so the default is one thread (--threads).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "intermediate_size", "tie_embeddings")


# --------------------------------------------------------------------- worker


def _hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _build_ctx(cfg):
    from finellama_rl.trainers.base import bare_context

    return bare_context(cfg, label="bench")


def run_worker(overrides: list[str], threads: int) -> dict:
    """Train a few steps with the composed config; return measured peak memory and s/step."""
    import torch

    from finellama_rl.compose import load_config
    from finellama_rl.job.model import count_parameters
    from finellama_rl.fileio import read_jsonl
    from finellama_rl.trainers.run import algorithm

    torch.set_num_threads(threads)
    cfg = load_config(overrides)
    ctx = _build_ctx(cfg)
    train = algorithm(cfg.trainer.algo)
    if cfg.trainer.algo.value == "grpo":  # imports are not step memory: load them before the mark
        import datasets  # noqa: F401
        from trl import GRPOTrainer  # noqa: F401
    cuda = torch.cuda.is_available() and cfg.hardware.device.value == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
    rss0 = _rss_kb()
    t0 = time.time()
    train(ctx)
    wall = time.time() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else (_hwm_kb() - rss0) / 1024
    sps = [r["perf/sec_per_step"] for r in read_jsonl(ctx.paths.metrics)][1:]
    return {"peak_mb": peak, "memory": "cuda_allocated" if cuda else "host_rss_hwm",
            "s_per_step": statistics.median(sps) if sps else wall, "params": count_parameters(ctx.policy)[1],
            "steps": cfg.trainer.max_steps, "seqs_per_step": cfg.trainer.prompts_per_step * cfg.trainer.num_generations}


# --------------------------------------------------------------------- parent


def algo_overrides(algo: str, args) -> list[str]:
    """Same sequences per step, micro batch and lengths for both algorithms."""
    common = [f"trainer.micro_batch={args.micro_batch}", f"trainer.max_completion_tokens={args.completion_tokens}",
              f"trainer.max_prompt_tokens={args.prompt_tokens}", f"trainer.max_steps={args.steps}",
              "trainer.save_every=100000", "trainer.log_every=1", "trainer.warmup_steps=0",
              "trainer.lr_schedule=constant", "data=arithmetic", "data.num_train=256"]
    if algo == "grpo":
        prompts = args.sequences // args.group
        return ["trainer=grpo", f"trainer.prompts_per_step={prompts}", f"trainer.num_generations={args.group}", *common]
    head = algo.split("-", 1)[1] if "-" in algo else "shared"
    return ["trainer=ppo", f"trainer.prompts_per_step={args.sequences}", "trainer.num_generations=1",
            f"trainer.ppo.value_head={head}", *common]


def model_overrides(shape: str, args) -> list[str]:
    """tiny, HxL (tiny architecture, hidden H, L layers) or a named conf/model shape with a small vocab."""
    if shape == "tiny":
        return ["model=tiny"]
    if re.fullmatch(r"\d+x\d+", shape):
        h, layers = shape.split("x")
        return ["model=tiny", f"model.hidden_size={h}", f"model.num_layers={layers}", f"model.intermediate_size={2 * int(h)}"]
    from finellama_rl.compose import load_config

    m = load_config([f"model={shape}"], resolve_paths=False).model  # shapes only; weights are random
    return ["model=tiny", *(f"model.{k}={getattr(m, k)}" for k in SHAPE_KEYS), f"model.vocab_size={args.vocab}"]


def run_one(shape: str, algo: str, args, exact_memory: bool) -> dict:
    hardware = ["hardware=cpu"] if args.device == "cpu" else [f"hardware={args.hardware}"]
    with tempfile.TemporaryDirectory(prefix="bench-ppo-grpo-") as tmp:
        overrides = [*model_overrides(shape, args), *hardware, *algo_overrides(algo, args),
                     f"run.results_dir={tmp}", f"run.dir={tmp}/run"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["OMP_NUM_THREADS"] = str(args.threads)
        if exact_memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--worker", json.dumps(overrides)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{shape}/{algo} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"model": shape, "algo": algo, **json.loads(lines[-1][len(RESULT_TAG):])}


def run_repeated(shape: str, algo: str, args) -> dict:
    """Peak from one memory run (CPU) and the minimum s/step over args.repeat time runs."""
    cpu = args.device == "cpu"
    runs = [run_one(shape, algo, args, exact_memory=False) for _ in range(args.repeat)]
    best = dict(run_one(shape, algo, args, exact_memory=True)) if cpu else dict(runs[0])
    best["s_per_step"] = min(r["s_per_step"] for r in runs)
    return best


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<14} {'algo':<12} {'params*':>11} {'seqs/step':>9} {'peak MB':>9} {'x GRPO':>7} {'s/step':>7}"
    out = [head, "-" * len(head)]
    grpo = {r["model"]: r["peak_mb"] for r in rows if r["algo"] == "grpo"}
    for r in rows:
        ratio = r["peak_mb"] / grpo[r["model"]] if grpo.get(r["model"]) else float("nan")
        out.append(f"{r['model']:<14} {r['algo']:<12} {r['params']:>11,} {r['seqs_per_step']:>9} "
                   f"{r['peak_mb']:>9.1f} {ratio:>7.2f} {r['s_per_step']:>7.2f}")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hardware", default="h100", help="conf/hardware profile for --device cuda")
    p.add_argument("--shapes", default="tiny,256x4", help="comma list: tiny, HxL, or a conf/model name")
    p.add_argument("--random-init-shape", default=None, help="also a random-init model with this conf/model's shapes, e.g. qwen2.5-0.5b")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary of --random-init-shape models")
    p.add_argument("--algos", default="grpo,ppo,ppo-adapter")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sequences", type=int, default=8, help="completions per step (PPO prompts; GRPO prompts x group)")
    p.add_argument("--group", type=int, default=4, help="GRPO num_generations")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--completion-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="time runs per row (the minimum s/step is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run")
    p.add_argument("--max-ratio", type=float, default=1.5, help="assert PPO peak <= this x GRPO peak")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker), args.threads)), flush=True)
        return 0
    shapes = [s for s in args.shapes.split(",") if s] + ([args.random_init_shape] if args.random_init_shape else [])
    rows = []
    for shape in shapes:
        for algo in args.algos.split(","):
            rows.append(run_repeated(shape, algo, args))
            print(f"  {shape} {algo}: {rows[-1]['peak_mb']:.1f} MB, {rows[-1]['s_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    print(f"device={args.device} sequences/step={args.sequences} (GRPO {args.sequences // args.group} prompts x {args.group}) "
          f"micro_batch={args.micro_batch} prompt<={args.prompt_tokens} completion<={args.completion_tokens} "
          f"steps={args.steps} threads={args.threads} repeat={args.repeat}")
    print(format_table(rows))
    print("* parameters as stored: a 4-bit weight counts as half an element (packed uint8)")
    grpo = {r["model"]: r["peak_mb"] for r in rows if r["algo"] == "grpo"}
    failed = [r for r in rows if r["algo"] == "ppo" and r["model"] in grpo and r["peak_mb"] > args.max_ratio * grpo[r["model"]]]
    assert not failed, f"PPO peak above {args.max_ratio}x GRPO: {failed}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
