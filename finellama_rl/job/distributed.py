"""Data parallel over the devices of one node or of several: the torchrun supervisor and
the few collective operations both trainers need.

How a multi-device run starts (hardware.gpus_per_node > 1, or hardware.processes > 1):
`python -m finellama_rl.train ...` (what SLURM jobs and sbatch scripts run) sees it is
not a torchrun worker and becomes the *supervisor*: it starts
`torchrun --standalone --nproc_per_node=N -m finellama_rl.train ...` and waits. Each
worker is one rank: NCCL on GPUs, gloo on CPU. Rank 0 alone writes files (metrics,
checkpoints, evaluations, attempts.jsonl); the others wait at barriers.

Out of memory on any rank: the other ranks are then stuck in a collective, so the
rank that ran out writes its host snapshot and the attempt (with the phase) and
exits with EXIT_OOM_RETRY; torchrun stops the others; the supervisor starts torchrun
again, and every rank reads the same attempts.jsonl and steps down to the same rung
(an OOM on one rank steps every rank down) and resumes from the snapshot: no step is
redone. Stop requests (SLURM's USR2/TERM reach the supervisor) are passed on through a
file that rank 0 reads every step; `TrainingMonitor.decide` makes every rank agree.

Several nodes (hardware.nodes=N, started by the SLURM job's controller as one srun step
with one task per node): each task is its node's supervisor and starts
`torchrun --nnodes=N --node_rank=<SLURM_NODEID> --rdzv_backend=static` on the first
node's address (FINELLAMA_MASTER_ADDR/PORT, which the controller asked SLURM for: node
names need not resolve). Static, not c10d: c10d ignores --node_rank and may put rank 0
on any node, while the run's lock and files belong on the first. Everything else is as
on one node (the run folder must be on a filesystem all nodes share): a stop request
written by any node's supervisor is seen by rank 0 and agreed by all ranks at a step
boundary; after an OOM every node's supervisor reads the same exit file of that round
(`logs/rank_exit.<round>.json`) and starts its torchrun again, on a new port.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional
from finellama_rl.errors import EXIT_OOM_RETRY, EXIT_STOPPED
from finellama_rl.results import RunPaths

log = logging.getLogger(__name__)



def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def nodes() -> int:
    """Nodes of this run (FINELLAMA_NODES, set by the SLURM job's controller)."""
    return int(os.environ.get("FINELLAMA_NODES", "1") or 1)


def node_rank() -> int:
    """This node's place among the run's nodes (SLURM_NODEID of the step's task)."""
    return int(os.environ.get("SLURM_NODEID", "0") or 0) if nodes() > 1 else 0


def is_worker() -> bool:
    """True inside a torchrun worker (a rank)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(cuda: bool) -> None:
    """Join the process group (once): NCCL on GPUs, gloo on CPU."""
    if world() <= 1 or initialized():
        return
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("rank %d of %d joined the process group (%s)", rank(), world(), dist.get_backend())


def leave() -> None:
    """Leave the process group (every rank, at the end of its run). A rank that exits with
    the group still up can abort at interpreter exit ("terminate called without an active
    exception", SIGABRT: gloo's threads outlive it) while rank 0 is still evaluating, and
    torchrun then stops rank 0 too. Local: no collective, so rank 0 may still be working."""
    if initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor):
    """In place, over all ranks (a no-op in one process); returns the tensor."""
    if initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    if initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(tensors) -> None:
    """Rank 0's values into every rank's tensors (identical starting weights)."""
    if initialized():
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params) -> None:
    """Sum the gradients of `params` over ranks in one flat buffer (the loss is already
    normalised by the global token count, so the sum is the global gradient)."""
    if not initialized():
        return
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def weights_digest(params) -> str:
    """SHA-256 of trainable weights (a few MB of LoRA): equal on every rank, or a bug."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def rank_digests(params) -> List[str]:
    """Every rank's weights_digest, in rank order (on every rank); rank 0 warns if they differ."""
    digest = weights_digest(params)
    if not initialized():
        return [digest]
    import torch.distributed as dist

    out: List[Optional[str]] = [None] * world()
    dist.all_gather_object(out, digest)
    if len(set(out)) > 1 and is_main():
        log.warning("ranks hold different trainable weights: %s", out)
    return [str(d) for d in out]


def write_exit_code(paths: RunPaths, code: int) -> None:
    """The exit code a rank means (torchrun reports only 1), for this start of the ranks."""
    paths.rank_exit_of(int(os.environ.get("FINELLAMA_ROUND", "0") or 0)).write_text(json.dumps({"code": code, "rank": rank()}))


def claim(path: Path) -> bool:
    """True for exactly one rank (the first to create `path`)."""
    try:
        fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def stop_requested(paths: RunPaths) -> bool:
    return paths.stop_request.exists()


# ----------------------------------------------------------------- supervisor


def torchrun_command(argv: List[str], nprocs: int, round_no: int = 0) -> List[str]:
    """torchrun for this node: standalone on one node; on several, the static rendezvous
    on the first node (a new port per round: the last round's may not be free yet)."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes() <= 1:
        return [*run, "--standalone", f"--nproc_per_node={nprocs}", "-m", "finellama_rl.train", *argv]
    port = int(os.environ["FINELLAMA_MASTER_PORT"]) + round_no
    return [*run, f"--nnodes={nodes()}", f"--nproc_per_node={nprocs}", f"--node_rank={node_rank()}",
            "--rdzv_backend=static", f"--master_addr={os.environ['FINELLAMA_MASTER_ADDR']}", f"--master_port={port}",
            "-m", "finellama_rl.train", *argv]


def rank_threads(threads: Optional[str], nprocs: int, cuda: bool) -> str:
    """OMP_NUM_THREADS of each rank: the process's threads (OMP_NUM_THREADS, which the job
    sets) shared by the node's ranks; unset, one per rank on CPU, else the machine's CPUs shared."""
    if threads and threads.isdigit():
        return str(max(1, int(threads) // nprocs))
    return "1" if not cuda else str(max(1, (os.cpu_count() or 1) // nprocs))


def _ranks_code(paths: RunPaths, round_no: int, code: int) -> int:
    """The code the ranks meant: torchrun says 1 for any failed rank; the rank that ran
    out of memory wrote EXIT_OOM_RETRY into this round's exit file."""
    if not code:
        return 0
    try:
        return int(json.loads(paths.rank_exit_of(round_no).read_text())["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return code


def supervise(argv: List[str], nprocs: int, run_dir: Path, max_restarts: int, cuda: bool = True) -> int:
    """Run this node's ranks under torchrun until they finish; start them again after an
    OOM (EXIT_OOM_RETRY), at most `max_restarts` times. Returns the ranks' exit code."""
    paths = RunPaths(Path(run_dir))
    paths.logs.mkdir(parents=True, exist_ok=True)
    if node_rank() == 0:  # the first node clears the last job's files; the others' torchrun waits for it
        paths.stop_request.unlink(missing_ok=True)
        for old in paths.rank_exit_files():
            old.unlink(missing_ok=True)
    proc: Optional[subprocess.Popen] = None

    def request_stop(signum, _frame):
        log.warning("received %s: asking the ranks to save and stop", signal.Signals(signum).name)
        paths.stop_request.write_text(signal.Signals(signum).name)

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, request_stop)
    env = os.environ.copy()  # the node's CPUs shared by its ranks (torchrun would leave the job's count to each)
    env["OMP_NUM_THREADS"] = rank_threads(os.environ.get("OMP_NUM_THREADS"), nprocs, cuda)
    code = 1
    for restart in range(max_restarts + 1):
        env["FINELLAMA_ROUND"] = str(restart)
        proc = subprocess.Popen(torchrun_command(argv, nprocs, restart), env=env)
        while proc.poll() is None:  # poll, not wait: the signal handler must be able to run
            time.sleep(0.5)
        code = _ranks_code(paths, restart, proc.returncode)
        if code not in (0, EXIT_OOM_RETRY) and paths.stop_request.exists():
            return EXIT_STOPPED  # the ranks saved and stopped as asked (torchrun reports 1 for their exit 75)
        if code != EXIT_OOM_RETRY:
            return code
        if paths.stop_request.exists():
            return EXIT_STOPPED  # asked to stop; the requeued job resumes from the snapshot
        log.warning("a rank ran out of memory: starting the %d ranks again at the next rung (%d)", nprocs, restart + 1)
    return code
