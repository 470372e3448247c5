"""How a sweep's runs become SLURM jobs (used by launch before anything is submitted):

1. **Packs** (`hardware.runs_per_gpu`): runs with the same request are packed k to a job
   that shares its GPU, CPUs and memory; each run gets an equal share (CUDA: a memory
   fraction of 0.9/k of the card, and a start rung the planner predicts to fit it). With
   `auto` (CUDA) a pack takes runs while the sum of their predicted peaks (at their start
   rungs) plus a CUDA context each stays within 90% of the card; each then gets a
   fraction in proportion to its peak. A job of one run is a pack of one.
2. **Arrays** (`hardware.slurm.arrays`): job units with the same request form one job
   array, throttled by `hardware.slurm.array_parallelism`, split into chunks of at most
   MaxArraySize tasks; a chunk of one is a plain job.

    units = plan_units(runs); chunks = group_units(units, max_array_size())

Runs that finish early in a pack free nothing: their share idles until the pack ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from finellama_rl.config import Device
from finellama_rl.errors import ConfigError
from finellama_rl.login.controller import CONTROLLER_MEM_MB, RunStep
from finellama_rl.login.sweep import PlannedRun
from finellama_rl.results import RunPaths, SweepPaths

GPU_SHARE = 0.9  # packed runs share 90% of the card (the rest: CUDA contexts, fragmentation)
CUDA_CONTEXT_GIB = 0.5  # per process, outside torch's allocator (unverified estimate; see docs/LOG.md)


@dataclass
class JobUnit:
    """One SLURM job or array task: one run, a pack of runs sharing a GPU, or one run on
    several nodes. `cfg` (the first run's) holds the request."""

    runs: List[PlannedRun]
    gpu_shares: List[Optional[float]] = field(default_factory=list)  # fraction of the card per run (CUDA packs)

    @property
    def cfg(self):
        return self.runs[0].cfg

    @property
    def packed(self) -> bool:
        return len(self.runs) > 1

    @property
    def name(self) -> str:
        r = self.cfg.run
        return f"fl-{r.sweep}-{r.name}" + (f"+{len(self.runs) - 1}" if self.packed else "")

    @property
    def label(self) -> str:
        return self.runs[0].label if not self.packed else f"pack of {', '.join(r.label for r in self.runs)}"

    def steps(self) -> List[RunStep]:
        """What the job's controller starts: one srun step per run with its share."""
        k, hw = len(self.runs), self.cfg.hardware
        mem = max(256, (hw.slurm.mem_gb * 1024 - CONTROLLER_MEM_MB) // k)
        shares = self.gpu_shares or [None] * k
        return [RunStep(r.cfg.run.name, r.cfg.run.dir, r.train_argv(), max(1, hw.slurm.cpus_per_task // k), mem,
                        nodes=hw.nodes, gpu_fraction=share, own_log=self.packed, cuda=hw.device == Device.cuda) for r, share in zip(self.runs, shares)]

    def folder(self, alone: bool) -> Path:
        """submitit's folder: the run's own for a plain job of one run, else the sweep's."""
        if alone and not self.packed:
            return RunPaths(Path(self.cfg.run.dir)).submitit_logs
        return SweepPaths.of_run(Path(self.cfg.run.dir)).submitit_logs


def request_key(run: PlannedRun) -> str:
    from finellama_rl.login import slurm

    return slurm.request_key(run.cfg)


def plan_units(runs: List[PlannedRun]) -> List[JobUnit]:
    """Pack runs per `hardware.runs_per_gpu` (runs of the same request only, in launch order)."""
    units: List[JobUnit] = []
    to_pack: Dict[str, List[PlannedRun]] = {}  # insertion-ordered: launch order kept
    for r in runs:
        if str(r.cfg.hardware.runs_per_gpu) == "1":
            units.append(JobUnit([r]))
        else:
            to_pack.setdefault(f"{request_key(r)}|{r.cfg.hardware.runs_per_gpu}", []).append(r)
    for group in to_pack.values():
        units.extend(_packs(group))
    return units


def _packs(runs: List[PlannedRun]) -> List[JobUnit]:
    hw = runs[0].cfg.hardware
    per_gpu = str(hw.runs_per_gpu)
    if per_gpu == "auto":
        return _auto_packs(runs) if hw.device == Device.cuda else [JobUnit([r]) for r in runs]
    k = int(per_gpu)
    if hw.device != Device.cuda:
        return [JobUnit(runs[i:i + k]) for i in range(0, len(runs), k)]
    fitted = [_fit_share(r, GPU_SHARE / k) for r in runs]
    return [JobUnit(fitted[i:i + k], [GPU_SHARE / k] * len(fitted[i:i + k])) for i in range(0, len(fitted), k)]


def _fit_share(r: PlannedRun, fraction: float) -> PlannedRun:
    """The run with the start rung the planner predicts to fit its share of the card;
    ConfigError when no rung does."""
    from finellama_rl.login.planner import choose_start_rung

    hw = r.cfg.hardware
    share = replace(r.cfg, hardware=replace(hw, gpu_mem_gb=hw.gpu_mem_gb * fraction))
    rung, why = choose_start_rung(share)
    if "no rung fits" in why:
        raise ConfigError("hardware.runs_per_gpu", f"{hw.runs_per_gpu} runs per GPU leave each "
                          f"{hw.gpu_mem_gb * fraction:.1f} GiB of hardware={hw.name}, and no rung of {r.label} is predicted "
                          "to fit that (python -m finellama_rl.plan shows the figures); pack fewer runs or use auto")
    if rung != r.start_rung and why != "configured":  # in place: reserve_sweep still renames this run's folder
        r.start_rung, r.rung_reason = rung, f"{why} of a {fraction:.0%} share"
    return r


def _auto_packs(runs: List[PlannedRun]) -> List[JobUnit]:
    """Greedy in launch order: add runs while their predicted peaks (and a CUDA context
    each) fit in 90% of the card; each run's fraction is in proportion to its peak."""
    from finellama_rl.login.memory import GIB
    from finellama_rl.login.planner import predicted_peak_bytes

    card = runs[0].cfg.hardware.gpu_mem_gb * GIB
    budget = GPU_SHARE * card
    units: List[JobUnit] = []
    pack: List[PlannedRun] = []
    peaks: List[int] = []
    for r in runs:
        peak = predicted_peak_bytes(r.cfg, r.start_rung) + int(CUDA_CONTEXT_GIB * GIB)
        if pack and sum(peaks) + peak > budget:
            units.append(_proportional(pack, peaks, budget, card))
            pack, peaks = [], []
        pack.append(r)
        peaks.append(peak)
    if pack:
        units.append(_proportional(pack, peaks, budget, card))
    return units


def _proportional(pack: List[PlannedRun], peaks: List[int], budget: float, card: float) -> JobUnit:
    if len(pack) == 1:
        return JobUnit(pack)
    total = sum(peaks)
    return JobUnit(pack, [round(p / total * budget / card, 4) for p in peaks])


def group_units(units: List[JobUnit], max_array: int) -> List[List[JobUnit]]:
    """Job units with the same request in one array (launch order kept), chunks of at most
    `max_array` tasks; with hardware.slurm.arrays=false every unit is a job of its own."""
    groups: Dict[str, List[JobUnit]] = {}
    alone: List[List[JobUnit]] = []
    for u in units:
        if not u.cfg.hardware.slurm.arrays:
            alone.append([u])
            continue
        groups.setdefault(request_key(u.runs[0]), []).append(u)
    chunks = [g[i:i + max_array] for g in groups.values() for i in range(0, len(g), max_array)]
    return chunks + alone


def chunk_name(chunk: List[JobUnit], index: int) -> str:
    """The job name of a chunk: the unit's for a plain job, `fl-<sweep>-array<k>` for an array."""
    if len(chunk) == 1:
        return chunk[0].name
    return f"fl-{chunk[0].cfg.run.sweep}-array{index}"
