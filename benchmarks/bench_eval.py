"""Benchmark: evaluation throughput (problems/s) at the old and the new batching.

Old (before issue 11): the eval batch was the training micro batch (4 on the smoke
preset), prompts went in file order, and pass@k put max(1, batch // k) prompts in a
generate call (1 prompt at k >= 4). New: eval.batch_size sequences per call (64 by
default), prompts sorted by length (longest first), pass@k with batch // k prompts
per call. Both run the same code otherwise (eval/generation.py, explicit decoding,
stop strings), so the difference is the batching alone.

The model is the smoke preset's (tiny 4-bit Qwen2, qwen_boxed prompts of ~110 tokens,
greedy, --max-new-tokens each; a random model never stops early, so every problem
costs the full budget). Old and new alternate, --repeat times; the table shows the
median problems/s of each and their ratio. CPU timings on a shared machine swing
(with 2 threads under a load of 10, both were 20x slower than with 1 thread on a
quiet machine): one thread by default, compare within one run only.

    .venv/bin/python benchmarks/bench_eval.py                  # greedy + pass@4, 64 problems, 1 thread
    .venv/bin/python benchmarks/bench_eval.py --problems 32 --repeat 3 --sizes 1,4,16,64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def setup(problems: int, max_new_tokens: int):
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="bench-eval-hf-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finellama_rl.compose import load_config
    from finellama_rl.task.data import load_problems
    from finellama_rl.eval.core import prepare_eval
    from finellama_rl.job.model import load_base, load_tokenizer

    results = tempfile.mkdtemp(prefix="bench-eval-results-")
    cfg = load_config(["experiment=smoke", f"run.results_dir={results}", f"eval.num_examples={problems}",
                       f"eval.max_new_tokens={max_new_tokens}", f"data.num_test={max(problems, 32)}"])
    tok = load_tokenizer(cfg.model)
    ev = prepare_eval(cfg, tok, load_problems(cfg.data, "test"), load_problems(cfg.data, "train"))
    return cfg, tok, ev, load_base(cfg.model, cfg.trainer, cfg.hardware)


def old_batching(model, tok, prompts, decoding, stops, batch: int) -> float:
    """File order, `batch` sequences per call (max(1, batch // k) prompts at k samples)."""
    from finellama_rl.eval.generation import generate_completions

    per_call = max(1, batch // decoding.num_return_sequences)
    start = time.perf_counter()
    for i in range(0, len(prompts), per_call):
        generate_completions(model, tok, prompts[i:i + per_call], decoding, stops, batch_size=batch, desc="old")
    return len(prompts) / (time.perf_counter() - start)


def new_batching(model, tok, prompts, decoding, stops, batch: int) -> float:
    from finellama_rl.eval.generation import generate_completions

    return generate_completions(model, tok, prompts, decoding, stops, batch_size=batch, desc="new").problems_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--old-batch", type=int, default=4, help="the smoke preset's trainer.micro_batch")
    parser.add_argument("--new-batch", type=int, default=64, help="eval.batch_size's default")
    parser.add_argument("--samples", type=int, default=4, help="k for the pass@k rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="", help="also: new batching at these batch sizes (e.g. 1,4,16,64)")
    args = parser.parse_args()

    import torch

    from finellama_rl.eval.generation import Decoding

    torch.set_num_threads(args.threads)
    cfg, tok, ev, model = setup(args.problems, args.max_new_tokens)
    greedy = ev.decoding
    sampled = Decoding(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7, num_return_sequences=args.samples, seed=0)
    new_batching(model, tok, ev.prompts[:4], greedy, ev.stops, 4)  # warm-up (kernels, stop-string tables)
    rows = []
    for label, decoding in (("greedy", greedy), (f"pass@{args.samples} sampling", sampled)):
        old, new = [], []
        for _ in range(args.repeat):  # interleaved: old, new, old, new, ...
            old.append(old_batching(model, tok, ev.prompts, decoding, ev.stops, args.old_batch))
            new.append(new_batching(model, tok, ev.prompts, decoding, ev.stops, args.new_batch))
        rows.append((label, statistics.median(old), statistics.median(new), old, new))
    print(f"\n{args.problems} problems, {args.max_new_tokens} new tokens each, prompts "
          f"{min(len(tok(p)['input_ids']) for p in ev.prompts)}-{max(len(tok(p)['input_ids']) for p in ev.prompts)} tokens "
          f"(smoke model, {ev.fmt.protocol.value}), {args.threads} threads, median of {args.repeat} interleaved runs")
    print(f"| decoding | old: batch {args.old_batch}, file order (problems/s) | new: batch {args.new_batch}, sorted (problems/s) | new / old |")
    print("|---|---|---|---|")
    for label, o, n, os_, ns in rows:
        print(f"| {label} | {o:.2f} ({', '.join(f'{x:.2f}' for x in os_)}) | {n:.2f} ({', '.join(f'{x:.2f}' for x in ns)}) | {n / o:.1f}x |")
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
        runs = {size: [] for size in sizes}
        for _ in range(args.repeat):  # interleaved: every size once per round
            for size in sizes:
                runs[size].append(new_batching(model, tok, ev.prompts, greedy, ev.stops, size))
        print("\n| eval.batch_size (greedy, sorted) | problems/s (median; runs) |\n|---|---|")
        for size in sizes:
            print(f"| {size} | {statistics.median(runs[size]):.2f} ({', '.join(f'{x:.2f}' for x in runs[size])}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
