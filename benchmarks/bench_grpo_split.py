"""GRPO split-invariance matrix (issue 20): one step's gradient for every accepted loss_type
at micro batch 8/4/2/1, one, two or four generate calls per rank, one process and two
ranks (torchrun, gloo), with default settings and with advantage_scaling=batch +
truncation=mask, on forced uneven completion lengths (tests/grpo_grad.py). Prints, per arm,
the gradient's relative difference to the one-process micro-8 one-call arm, whether the
same completions were sampled, and the logged reward_std and entropy; then the worst arm
per loss. tests/test_grpo_split.py runs a few representative cells in CI.

    .venv/bin/python benchmarks/bench_grpo_split.py                # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_grpo_split.py --no-ranks     # one process only
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from grpo_grad import Arms, relative_difference  # noqa: E402

LOSSES = ("grpo", "dr_grpo", "dapo")
MODES = {"group, none": "", "batch, mask": ":batch:mask"}
ONE = [f"{m}:{g}" for m in (8, 4, 2, 1) for g in (0, 4, 2)]  # micro:generation (8 sequences: 1, 2, 4 calls)
TWO = [f"{m}:{g}" for m in (4, 2) for g in (0, 2)]  # per rank 4 sequences: 1 or 2 calls


def calls(micro_gen: str, per_rank: int) -> int:
    gen = int(micro_gen.split(":")[1])
    return -(-per_rank // gen) if gen else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-ranks", action="store_true", help="skip the two-rank arms (torchrun)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"bench_grpo_split: {time.strftime('%Y-%m-%d %H:%M')}, CPU, load {os.getloadavg()[0]:.1f}, 1 thread per process")
    one = Arms(Path(tempfile.mkdtemp(prefix="bench-split-")))  # builds the tiny model before the ranks load it
    ranks = {}
    if not args.no_ranks:
        out = Path(tempfile.mkdtemp(prefix="bench-split-")) / "ranks.pt"
        arms = [f"{loss}:{mg}{mode}" for loss in LOSSES for mode in MODES.values() for mg in TWO]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(TESTS / "grpo_grad.py"), str(out), *arms], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        ranks = torch.load(out, weights_only=False)
    print(f"\n{'loss':<8} {'scaling, truncation':<20} {'ranks':>5} {'micro':>5} {'calls':>5} {'grad rel diff':>14} "
          f"{'same samples':>12} {'grad_norm':>10} {'reward_std':>10} {'entropy':>9}")
    worst = {}
    for loss in LOSSES:
        for mode, suffix in MODES.items():
            ref = None
            cells = [(1, mg) for mg in ONE] + [(2, mg) for mg in TWO if ranks]
            for world, mg in cells:
                r = one.gradient(f"{loss}:{mg}{suffix}") if world == 1 else ranks[f"{loss}:{mg}{suffix}"]
                ref = ref or r
                rel = relative_difference(r["grad"], ref["grad"])
                worst[(loss, mode)] = max(worst.get((loss, mode), 0.0), rel)
                logs = r["logs"]
                print(f"{loss:<8} {mode:<20} {world:>5} {mg.split(':')[0]:>5} {calls(mg, 8 // world):>5} {rel:>14.2e} "
                      f"{str(r['samples'] == ref['samples']):>12} {logs['grad_norm']:>10.6f} {logs['reward_std']:>10.6f} "
                      f"{logs['entropy']:>9.5f}")
    print("\nworst arm per loss (target: < 1e-4 relative):")
    for (loss, mode), rel in worst.items():
        print(f"   {loss:<8} {mode:<20} {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
