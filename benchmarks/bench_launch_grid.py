"""Plan and submit a 100-run ablation grid (4 learning rates x 5 seeds x 5 LoRA ranks,
tiny model) to the local SLURM cluster with every check on; print the times, the sbatch
calls and the jobs created, as one job array (the default) and as one job per run
(`hardware.slurm.arrays=false`).

    bash scripts/slurm_cluster/cluster.sh start --nodes 2
    python benchmarks/bench_launch_grid.py [--repeats 3]        (also: make bench-slurm)

Each repeat and arm runs the stages of `python -m finellama_rl.launch` in this process
and times them: plan (compose, validate and pick the start rung of every run), checks
(launcher, sweep folder, pre-flight: folder writable, model/data, partitions from
sinfo, ledger and lock of every run folder), `sbatch --test-only` of every job's or
array's exact script, and the submission (each run recorded in the ledger). Then the
same command end to end as a subprocess (imports included). sbatch calls are counted by
a wrapper put first on PATH (it runs the real sbatch); jobs created are what squeue -r
lists for the sweep (distinct job or array ids, and tasks). The jobs are submitted held
(`--hold`) and cancelled at once with `finellama_rl.status --cancel` (also timed), so the
2-CPU machine is not flooded. Nothing here is simulated: the jobs are real SLURM jobs.
"""
from __future__ import annotations

import argparse
import os
import shutil
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
ARMS = {"one array": [], "one job per run": ["hardware.slurm.arrays=false"]}


def cluster_env() -> Dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster" / "cluster.sh"), "env"], capture_output=True,
                         text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.strip("'")
    return env


def count_sbatch(folder: Path) -> Path:
    """An `sbatch` first on PATH that logs each call (test-only or not) and runs the real one."""
    real = shutil.which("sbatch")
    log = folder / "sbatch_calls"
    (folder / "sbatch").write_text(f'#!/bin/sh\ncase " $* " in *" --test-only "*) echo test >> {log};; '
                                   f'*) echo submit >> {log};; esac\nexec {real} "$@"\n')
    (folder / "sbatch").chmod(0o755)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"
    return log


def calls(log: Path) -> Dict[str, int]:
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return {"sbatch_test_only": lines.count("test"), "sbatch_submit": lines.count("submit")}


def queued(sweep: Path) -> Dict[str, int]:
    """Jobs (distinct job or array ids) and tasks squeue -r lists for this sweep."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%F|%j"], capture_output=True, text=True).stdout
    mine = [line.split("|")[0] for line in out.splitlines() if line.split("|", 1)[-1].startswith(f"fl-{sweep.name}")]
    return {"jobs_created": len(set(mine)), "tasks_queued": len(mine)}


def cancel(sweep: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.status", str(sweep), "--cancel"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cancelled 100 job(s)" in proc.stdout, proc.stdout[-500:]
    return time.perf_counter() - t0


def in_process(results: Path, arm: List[str], log: Path) -> Dict[str, float]:
    from finellama_rl import launch
    from finellama_rl.compose import _COMPOSED
    from finellama_rl.login import sweep
    from finellama_rl.login.submission import Submission

    _COMPOSED.clear()  # a fresh process composes each group selection once
    times: Dict[str, float] = {}
    t0 = time.perf_counter()
    runs = sweep.plan_runs([*GRID, *arm, f"run.results_dir={results}"])
    times["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    slurm_mode = launch.use_slurm(runs)
    sweep.reserve_sweep(runs, create=False)
    launch.preflight(runs, slurm_mode)
    chunks = launch.job_chunks(runs)
    times["checks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    launch.test_with_sbatch(chunks)
    times["test_only"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    created = sweep.reserve_sweep(runs, create=True)
    with Submission(runs, sweep.ledger_path, created) as sub:
        rows = [row for i, chunk in enumerate(chunks) for row in sub.submit_chunk(chunk, i)]
    times["submit"] = time.perf_counter() - t0
    assert len(runs) == len(rows) == 100
    times["planned_total"] = times["plan"] + times["checks"]
    times["submitted_total"] = times["test_only"] + times["submit"]
    times.update(calls(log))
    where = Path(runs[0].cfg.run.dir).parent
    times.update(queued(where))
    times["cancel_100"] = cancel(where)
    return times


def end_to_end(results: Path, arm: List[str], log: Path) -> Dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.launch", *GRID, *arm, f"run.results_dir={results}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("grpo-tiny-cpu-")]
    assert len(table) == 100, proc.stdout[-1000:]
    calls(log)
    cancel(next(p for p in results.iterdir() if p.is_dir()))
    return {"cli_total": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(cluster_env())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        log = count_sbatch(Path(tmp))
        rows: Dict[str, List[Dict[str, float]]] = {arm: [] for arm in ARMS}
        for i in range(args.repeats):
            for arm, extra in ARMS.items():
                t = in_process(Path(tmp) / f"{i}-{arm}-a".replace(" ", "_"), extra, log)
                t.update(end_to_end(Path(tmp) / f"{i}-{arm}-b".replace(" ", "_"), extra, log))
                rows[arm].append(t)
                print(f"repeat {i}, {arm}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
    print("\nmedian over repeats (100 runs; 2 shared CPU cores; seconds unless a count):")
    for arm, found in rows.items():
        print(f"  {arm}:")
        for key in found[0]:
            values = [r[key] for r in found]
            print(f"    {key:16s} {statistics.median(values):7.2f}   (min {min(values):.2f}, max {max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
