"""Host-memory snapshots of training state, and RNG/scheduler state in safe formats.

Why: after an in-process out-of-memory the run steps down the ladder and must not
redo any step. Both trainers copy everything a checkpoint holds (adapter weights,
value head, optimizer and scheduler state, RNG, step, data position and unlogged
metrics) into host memory after every global step; LoRA state is megabytes. After
an OOM, `SnapshotHolder.write` puts the last one on disk as a checkpoint-format
folder (`checkpoints/.snapshot/step_N`, committed like a checkpoint) and the next
attempt resumes from it: the failing step is retried at the next rung, nothing else
is repeated. A snapshot holds no reference to the model, so the model can be freed
before the next rung loads.

Cost: a snapshot is taken after every step, so it reuses the host tensors of the
snapshot before the latest one (`SnapshotHolder.spare`, no longer needed once a newer
snapshot exists) and fills them with one foreach copy (`host_copy`); two snapshots are
held, as before at the moment a new one was taken. The latest snapshot is never
written into, so an OOM (or any exception) while a snapshot is being taken leaves the
previous one intact.

Safe loading: nothing read from a run folder is unpickled with weights_only=False.
RNG state goes to `rng_state.safetensors` (tensors plus JSON metadata), the LR
scheduler to `scheduler.json`; optimizer.pt is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

RNG_FILE = "rng_state.safetensors"
SCHEDULER_FILE = "scheduler.json"


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (a copy even when already there)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def _tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in a nest of dicts, lists and tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _replace(obj: Any, new: Iterator[torch.Tensor]) -> Any:
    """`obj` with its tensors replaced, in `_tensors` order, by the next items of `new`."""
    if isinstance(obj, torch.Tensor):
        return next(new)
    if isinstance(obj, dict):
        return {k: _replace(v, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return type(obj)(_replace(v, new) for v in obj)
    return copy.copy(obj) if isinstance(obj, list) else obj  # plain data (e.g. a param group's index list)


def host_copy(obj: Any, reuse: Any = None) -> Any:
    """`to_host(obj)`, writing into the tensors of `reuse` (an earlier host_copy that
    nobody reads any more) when it has the same tensor shapes and dtypes: no allocation,
    one foreach copy on the CPU (pinned buffers and a synchronised copy from a GPU)."""
    src = [t.detach() for t in _tensors(obj, [])]
    dst = _tensors(reuse, []) if reuse is not None else []
    if len(dst) != len(src) or any(d.shape != s.shape or d.dtype != s.dtype or d.is_cuda for d, s in zip(dst, src)):
        dst = [torch.empty(s.shape, dtype=s.dtype, device="cpu", pin_memory=s.is_cuda) for s in src]
    on_cpu = [(d, s) for d, s in zip(dst, src) if not s.is_cuda]
    if on_cpu:
        torch._foreach_copy_([d for d, _ in on_cpu], [s for _, s in on_cpu])
    devices = set()
    for d, s in zip(dst, src):
        if s.is_cuda:
            d.copy_(s, non_blocking=True)  # into pinned memory: asynchronous until the synchronize below
            devices.add(s.device)
    for device in devices:
        torch.cuda.synchronize(device)
    return _replace(obj, iter(dst))


def adapter_state(model, name: str = "default", reuse: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Host copy of one LoRA adapter's weights, keyed as PEFT saves them
    (get_peft_model_state_dict), read straight from named_parameters: PEFT's own
    function builds the whole model's state_dict (packing every 4-bit weight) and cost
    ~2% of a GRPO step when called after every step. `reuse`: see host_copy."""
    tag = f".{name}."
    live = {k.replace(f".{name}", "", 1): v for k, v in model.named_parameters() if tag in k and "lora_" in k}
    if not live:  # not a plain LoRA adapter (e.g. another PEFT method): PEFT's own, slower path
        from peft import get_peft_model_state_dict

        live = get_peft_model_state_dict(model, adapter_name=name)
    return host_copy(live, reuse)


# ------------------------------------------------------------------------ RNG


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states: new host objects on every call
    (getstate/get_state/get_rng_state return copies, CUDA states as CPU tensors), so a
    snapshot keeps them as they are, without another copy."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])


def save_rng(path: Path, state: Dict[str, Any]) -> None:
    """Tensors in safetensors, the rest as JSON in its metadata: no pickle."""
    from safetensors.torch import save_file

    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"cpu": state["cpu"].contiguous(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda_{i}"] = s.cpu().contiguous()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
            "cuda_devices": str(len(state.get("cuda", [])))}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> Dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = json.loads(meta["python"])
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    state = {"python": (version, tuple(internal), gauss), "numpy": (kind, keys, pos, has_gauss, cached),
             "cpu": tensors["cpu"]}
    cuda = int(meta.get("cuda_devices", "0"))
    if cuda:
        state["cuda"] = [tensors[f"cuda_{i}"] for i in range(cuda)]
    return state


def save_scheduler(path: Path, state: Dict[str, Any]) -> None:
    """LambdaLR-style state (numbers, lists, None) as JSON; refuses anything else."""
    Path(path).write_text(json.dumps(state))


def load_scheduler(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


# What the Hugging Face Trainer's RNG file (rng_state.pth) may hold besides tensors: numpy arrays
# (the same short list transformers allows when it loads it with weights_only=True).
NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
NEVER_LOADED = ("training_args.bin",)  # the HF Trainer writes it and never reads it back


def unsafe_pickle(folder: Path) -> Optional[str]:
    """The first pickle file of a checkpoint folder (*.pt, *.pth, *.bin) that names a
    Python object beyond tensors, plain data and numpy arrays, as one line naming the file
    and what it names; None when all are safe. Reads the pickles' opcodes only (torch's
    get_unsafe_globals_in_checkpoint): nothing is executed or constructed."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".pt", ".pth", ".bin") and p.name not in NEVER_LOADED)
    for path in files:
        try:
            names = get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - any reason the file cannot be scanned
            return f"{path} is not a readable torch file ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        bad = [n for n in names if n not in NUMPY_GLOBALS and not n.startswith("numpy.dtypes.")]
        if bad:
            return f"{path} holds pickled Python objects ({', '.join(bad[:3])}) that are never loaded: only tensors and plain data are"
    return None


def load_optimizer(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """An optimizer state dict through torch's restricted unpickler (tensors and plain data only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------ snapshots


@dataclass
class Snapshot:
    step: int
    payload: Dict[str, Any]  # CPU tensors and plain data; no model references
    write: Callable[[Path, Dict[str, Any]], None]  # writes payload as a checkpoint-format folder
    info: Dict[str, Any] = field(default_factory=dict)  # finellama_state.json extras (data position, pending eval)


class SnapshotHolder:
    """The latest host-memory snapshot of a run (one per process), kept across ladder attempts."""

    def __init__(self) -> None:
        self.latest: Optional[Snapshot] = None
        # The payload the latest snapshot replaced: nobody reads it any more, so the next
        # capture may write its tensors into it (host_copy's `reuse`). Never the latest's.
        self.spare: dict[str, Any] | None = None

    def take(self, step: int, payload: Dict[str, Any], write: Callable[[Path, Dict[str, Any]], None],
             **info: Any) -> Snapshot:
        previous = self.latest
        self.latest = Snapshot(step, payload, write, dict(info))
        self.spare = previous.payload if previous is not None and previous.payload is not payload else None
        return self.latest

    def reusable(self, key: str) -> Any:
        """The part `key` of the spare payload (host_copy's `reuse`), or None."""
        return self.spare.get(key) if self.spare is not None else None

    def mark(self, **info: Any) -> None:
        """Update the latest snapshot's info (e.g. its evaluation has now run)."""
        if self.latest is not None:
            self.latest.info.update(info)

    def write(self, checkpoints: Path, newer_than: int) -> Optional[Path]:
        """Commit the latest snapshot to checkpoints/.snapshot/ if it is newer than
        `newer_than` (the latest complete checkpoint's step); returns its folder."""
        from finellama_rl.checkpoint import commit_checkpoint, snapshot_root, staging_root

        snap = self.latest
        if snap is None or snap.step <= newer_than:
            return None
        staged = staging_root(checkpoints) / f"snapshot-{snap.step}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        snap.write(staged, snap.payload)
        return commit_checkpoint(snapshot_root(checkpoints), staged, snap.step, {**snap.info, "snapshot": True}, 1)
