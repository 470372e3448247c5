"""Which phase of a step a trainer is in, and deterministic out-of-memory faults for CPU
tests of the OOM ladder (debug.oom_above_tokens, debug.oom_generation_above_sequences,
debug.oom_at_step, debug.host_mem_mb_per_sequence).

The trainers wrap their phases in `with tracker.phase(Phase.generation): ...`; an
out-of-memory remembers the innermost phase it passed through (`phase_of`), and the
in-job ladder (job/oom_loop.py) steps down the knob of that phase. Faults are real
`torch.OutOfMemoryError`s raised from a forward pre-hook on the input embedding, so they
strike whichever wrapper (PEFT, HF, TRL, our PPO) runs the model. torch is imported
only when a fault fires.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from finellama_rl.config import DebugConfig
from finellama_rl.ladder.attempts import read_attempts
from finellama_rl.ladder.rungs import Phase
from finellama_rl.results import RunPaths

PHASE_ATTR = "finellama_phase"  # set on an exception by the innermost phase it passed through


# ------------------------------------------------------------------- phases


class PhaseTracker:
    """Which phase of a step the trainer is in, so that an out-of-memory can be
    attributed (attempts.jsonl `phase`) and the ladder can step down the knob of that
    phase. Trainers wrap their phases in `with tracker.phase(Phase.generation): ...`
    and set `tracker.step` at the start of each global step."""

    def __init__(self, fault: Optional["FaultInjector"] = None):
        self.current = Phase.other
        self.step = 0
        self.fault = fault

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            if self.fault is not None:
                self.fault.on_phase(name, self.step)
            yield
        except BaseException as exc:
            if getattr(exc, PHASE_ATTR, None) is None:
                try:
                    setattr(exc, PHASE_ATTR, name)  # the innermost phase wins
                except AttributeError:
                    pass
            raise
        finally:
            self.current = previous


def phase_of(exc: BaseException, tracker: Optional[PhaseTracker] = None) -> str:
    """The phase an exception happened in (following `raise ... from`)."""
    current: Optional[BaseException] = exc
    while current is not None:
        phase = getattr(current, PHASE_ATTR, None)
        if phase:
            return phase
        current = current.__cause__
    return tracker.current if tracker is not None else Phase.other


# -------------------------------------------------------------- fault injection


class FaultInjector:
    """Deterministic out-of-memory errors (real torch.OutOfMemoryError) for CPU tests:

    - a training forward (grad enabled) of more than `oom_above_tokens` tokens, and a
      generation forward of more than `generation_above` sequences (a memory budget);
    - once per run folder, an OOM when phase `oom_phase` starts at global step
      `oom_at_step` (`armed` is false when attempts.jsonl already has that OOM);
    - host RAM held per micro-batch sequence (a job over SLURM's --mem).
    """

    def __init__(self, d, armed: bool = True):
        self.oom_above_tokens = d.oom_above_tokens
        self.generation_above = d.oom_generation_above_sequences
        self.at_step, self.at_phase, self.armed = d.oom_at_step, d.oom_phase.value, armed
        if d.oom_rank is not None:
            import os

            self.armed = armed and int(os.environ.get("RANK", "0")) == d.oom_rank
        self.host_mb = d.host_mem_mb_per_sequence
        self.tracker: Optional[PhaseTracker] = None
        self._held: Optional[bytearray] = None

    @staticmethod
    def _oom(message: str):
        import torch

        return torch.OutOfMemoryError(f"simulated out of memory: {message}")

    def on_phase(self, name: str, step: int) -> None:
        if self.armed and self.at_step is not None and name == self.at_phase and step == self.at_step:
            self.armed = False
            raise self._oom(f"debug.oom_at_step={step} in phase {name}")

    def __call__(self, module, args, kwargs):
        import torch

        ids = args[0] if args else kwargs.get("input")  # (B, T) token ids entering the embedding
        if ids is None:
            return None
        in_generation = self.tracker is not None and self.tracker.current == Phase.generation
        if in_generation and self.generation_above is not None and ids.shape[0] > self.generation_above:
            raise self._oom(f"a generation batch of {ids.shape[0]} sequences exceeds "
                            f"debug.oom_generation_above_sequences={self.generation_above}")
        if not torch.is_grad_enabled():
            return None
        if self.host_mb:
            self._held = None
            held = bytearray(ids.shape[0] * self.host_mb * 1024 * 1024)
            held[::4096] = b"\x01" * len(held[::4096])  # touch every page so it is resident
            self._held = held
        if self.oom_above_tokens is not None and ids.numel() > self.oom_above_tokens:
            raise self._oom(f"a forward of {tuple(ids.shape)} = {ids.numel()} tokens "
                            f"exceeds debug.oom_above_tokens={self.oom_above_tokens}")
        return None


def injected_already(paths: RunPaths, phase: str) -> bool:
    return any(a["outcome"] == "oom" and a.get("phase") == phase and "debug.oom_at_step" in str(a.get("error", ""))
               for a in read_attempts(paths))


def install_fault_injection(policy, d: DebugConfig, paths: RunPaths) -> PhaseTracker:
    """A PhaseTracker for this attempt, with the debug.* faults wired in (if any)."""
    wanted = (d.oom_above_tokens is not None or d.host_mem_mb_per_sequence or d.oom_at_step is not None
              or d.oom_generation_above_sequences is not None)
    if not wanted:
        return PhaseTracker()
    fault = FaultInjector(d, armed=not injected_already(paths, d.oom_phase.value))
    tracker = PhaseTracker(fault)
    fault.tracker = tracker
    # The input embedding sees every forward, whichever wrapper (PEFT, HF, TRL, our PPO) calls it.
    policy.get_input_embeddings().register_forward_pre_hook(fault, with_kwargs=True)
    return tracker
