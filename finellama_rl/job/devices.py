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
