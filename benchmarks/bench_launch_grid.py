"""Plan and submit a 100-run ablation grid (4 learning rates x 5 seeds x 5 LoRA ranks,
tiny model) to the local SLURM cluster with every check on, and print the times.

    bash scripts/slurm_cluster/cluster.sh start
    python benchmarks/bench_launch_grid.py [--repeats 3]        (also: make bench-slurm)

Each repeat runs the stages of `python -m finellama_rl.launch` in this process and
times them: plan (compose, validate and pick the start rung of every run), checks
(launcher, sweep folder, pre-flight: folder writable, model/data, partitions from
sinfo, ledger and lock of every run folder), `sbatch --test-only` of every run's exact
script, and the submission (100 training jobs + 100 watchdogs, each recorded in the
ledger). Then the same command end to end as a subprocess (imports included). The jobs
are submitted held (`--hold`) and cancelled at once with `finellama_rl.status --cancel`
(also timed), so the 2-CPU machine is not flooded. Nothing here is simulated: the
jobs are real SLURM jobs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GRID = ["-m", "experiment=smoke", "trainer.learning_rate=1e-4,3e-4,1e-3,3e-3", "trainer.seed=0,1,2,3,4",
        "trainer.lora.r=2,4,8,16,32", "launcher=slurm", "hardware.slurm.cpus_per_task=1", "hardware.slurm.mem_gb=2",
        '+hardware.slurm.additional.hold=""']


def cluster_env() -> Dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster" / "cluster.sh"), "env"], capture_output=True,
                         text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.strip("'")
    return env


def cancel(sweep: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.status", str(sweep), "--cancel"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cancelled 200 job(s)" in proc.stdout, proc.stdout[-500:]
    return time.perf_counter() - t0


def in_process(results: Path) -> Dict[str, float]:
    from finellama_rl import launch
    from finellama_rl.login import sweep
    from finellama_rl.compose import _COMPOSED
    from finellama_rl.login.submission import Submission

    _COMPOSED.clear()  # a fresh process composes each group selection once
    times = {}
    t0 = time.perf_counter()
    runs = sweep.plan_runs([*GRID, f"run.results_dir={results}"])
    times["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    slurm_mode = launch.use_slurm(runs)
    sweep.reserve_sweep(runs, create=False)
    launch.preflight(runs, slurm_mode)
    times["checks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    launch.test_with_sbatch(runs)
    times["test_only"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    created = sweep.reserve_sweep(runs, create=True)
    with Submission(runs, sweep.ledger_path, created) as sub:
        rows = [sub.submit(r) for r in runs]
    times["submit"] = time.perf_counter() - t0
    assert len(runs) == len(rows) == 100
    times["planned_total"] = times["plan"] + times["checks"]
    times["submitted_total"] = times["test_only"] + times["submit"]
    times["cancel_200"] = cancel(Path(runs[0].cfg.run.dir).parent)
    return times


def end_to_end(results: Path) -> Dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.launch", *GRID, f"run.results_dir={results}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("grpo-tiny-cpu-")]
    assert len(table) == 100, proc.stdout[-1000:]
    sweep = next(p for p in results.iterdir() if p.is_dir())
    return {"cli_total": seconds, "cancel_200": cancel(sweep)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(cluster_env())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: List[Dict[str, float]] = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
            t = in_process(Path(tmp) / "a")
            t.update({k: v for k, v in end_to_end(Path(tmp) / "b").items() if k == "cli_total"})
            rows.append(t)
            print(f"repeat {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
    print("\nmedian over repeats (100 runs; 2 shared CPU cores):")
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"  {key:16s} {statistics.median(values):6.2f} s   (min {min(values):.2f}, max {max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
