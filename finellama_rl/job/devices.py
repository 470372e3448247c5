"""Device memory between attempts and evaluations: give cached CUDA memory back and read
the peaks an attempt reached. torch is imported inside the functions (this module is
imported on the way to training, where torch is loaded anyway).
"""
from __future__ import annotations

from typing import Dict, Optional


def free_memory(reset_peak: bool = True) -> None:
    """Collect garbage and return cached CUDA blocks (after an out-of-memory, between
    checkpoints evaluated on one base, after a scoring model is dropped)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> Dict[str, Optional[float]]:
    """The peak CUDA memory allocated (None without CUDA) and the peak host RSS, in GiB."""
    import resource

    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_gpu_mem_gb": gpu, "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def cap_gpu_memory() -> Optional[float]:
    """A packed run (hardware.runs_per_gpu) keeps to its share of the GPU: the job's
    controller sets FINELLAMA_GPU_FRACTION and this process caps torch's allocator there
    (torch.cuda.set_per_process_memory_fraction), so an out-of-memory beyond its share is
    raised in this process only and its own OOM ladder steps it down. Returns the fraction."""
    import os

    value = os.environ.get("FINELLAMA_GPU_FRACTION")
    if not value:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    fraction = min(1.0, max(0.01, float(value)))
    torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    return fraction
