"""The job side of the OOM ladder: attempts.jsonl (one line per attempt, with the
phase an out-of-memory happened in), the rung an attempt starts at, the phase
tracker the trainers report to, and deterministic fault injection so the ladder is
exercised on CPU. The ladder of a config is in ladder/run_ladder.py, the fit memory in fitmem.py.

Used by finellama_rl.train (in-process ladder) and finellama_rl.login.resubmit
(scheduler-level ladder). No torch at import.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

from finellama_rl.config import Config
from finellama_rl.ladder.rungs import Phase, Rung, fit_generation_batch, step_down
from finellama_rl.results import RunPaths
from finellama_rl.fileio import append_jsonl, read_jsonl

OOM_OUTCOMES = ("oom", "oom_killed")
PHASE_ATTR = "finellama_phase"  # set on an exception by the innermost phase it passed through


ATTEMPT_RECORD = {"rung": int, "outcome": str}


def read_attempts(paths: RunPaths) -> List[Dict[str, Any]]:
    """Valid attempt records (malformed lines are skipped with one warning)."""
    return read_jsonl(paths.attempts, require=ATTEMPT_RECORD)


def record_attempt(paths: RunPaths, rung: Rung, outcome: str, **fields: Any) -> Dict[str, Any]:
    s = rung.setting
    record = {"attempt": len(read_attempts(paths)) + 1, "rung": rung.index, "micro_batch": s.micro_batch,
              "grad_accum": s.grad_accum, "generation_batch": s.generation_batch,
              "max_prompt_tokens": s.max_prompt_tokens, "max_completion_tokens": s.max_completion_tokens,
              "activation_checkpointing": s.activation_checkpointing,
              "changes_experiment": rung.changes_experiment, "outcome": outcome, **fields}
    append_jsonl(paths.attempts, record)
    return record


def _rung_of_record(ladder: List[Rung], record: Dict[str, Any]) -> Rung:
    """The rung an attempt ran at: its list rung with the generation batch it used."""
    rung = ladder[min(int(record["rung"]), len(ladder) - 1)]
    gen = record.get("generation_batch")
    if not gen or not rung.setting.generation_batch or gen == rung.setting.generation_batch:
        return rung
    setting = fit_generation_batch(rung.setting, gen)
    return Rung(rung.index, setting, rung.changes_experiment, f"generation_batch {setting.generation_batch}")


def start_point(cfg: Config, paths: RunPaths, ladder: List[Rung]) -> Optional[Rung]:
    """The rung this attempt starts at: the configured (planned) one, or after an
    out-of-memory the one step_down chooses for the phase that ran out (the whole
    list's next rung when the phase is unknown, e.g. killed by the scheduler), or the
    last attempt's rung. None: every rung has run out of memory."""
    configured = ladder[min(cfg.ladder.start_rung, len(ladder) - 1)]
    attempts = read_attempts(paths)
    if not attempts:
        return configured
    last = attempts[-1]
    rung = _rung_of_record(ladder, last)
    if last["outcome"] in OOM_OUTCOMES:
        rung = step_down(ladder, rung, last.get("phase") or Phase.other)
        if rung is None:
            return None
    return configured if configured.index > rung.index else rung


def start_rung(cfg: Config, paths: RunPaths, ladder: List[Rung]) -> int:
    """The list index of start_point (len(ladder) when the ladder is exhausted)."""
    rung = start_point(cfg, paths, ladder)
    return len(ladder) if rung is None else rung.index


def format_attempts(attempts: List[Dict[str, Any]]) -> str:
    lines = ["attempt rung micro x accum   gen prompt/completion ckpt outcome      phase       steps  error"]
    for a in attempts:
        lines.append(f"{a['attempt']:>7} {a['rung']:>4} {a['micro_batch']:>5} x {a['grad_accum']:<5} "
                     f"{a.get('generation_batch') or '-':>5} "
                     f"{a['max_prompt_tokens']:>6}/{a['max_completion_tokens']:<10} {str(a['activation_checkpointing'])[0]:>4} "
                     f"{a['outcome']:<12} {a.get('phase') or '-':<11} {a.get('steps_done', '?'):>5}  "
                     f"{str(a.get('error', ''))[:60]}")
    return "\n".join(lines)


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


def install_fault_injection(policy, cfg: Config, paths: RunPaths) -> PhaseTracker:
    """A PhaseTracker for this attempt, with the debug.* faults wired in (if any)."""
    d = cfg.debug
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


# ------------------------------------------------- attempts that never recorded their end


def open_attempt(paths: RunPaths, rung: int, step0: int, started: float) -> None:
    """Mark an attempt as running: if the process is killed before it records its end
    (SIGKILL, node failure, the scheduler's OOM kill), the watchdog or the next start
    records it from this marker."""
    import os

    from finellama_rl.fileio import atomic_write_json

    atomic_write_json(paths.current_attempt, {"rung": rung, "step0": step0, "started": started,
                                                    "job_id": os.environ.get("SLURM_JOB_ID"), "closed": False})


def close_attempt(paths: RunPaths) -> None:
    from finellama_rl.fileio import atomic_write_json, read_json_object

    marker = read_json_object(paths.current_attempt, quiet=True)
    if marker is not None and marker.get("closed") is False:
        atomic_write_json(paths.current_attempt, {**marker, "closed": True})


def unclosed_attempt(paths: RunPaths) -> Optional[Dict[str, Any]]:
    """The marker of an attempt that never recorded its end, or None."""
    from finellama_rl.fileio import read_json_object

    marker = read_json_object(paths.current_attempt, "the attempt marker", require={"rung": int, "step0": int})
    return marker if marker is not None and marker.get("closed") is False else None


def record_unclosed_attempt(paths: RunPaths, ladder: List[Rung], last_step: int) -> Optional[Dict[str, Any]]:
    """At start: an earlier attempt that was hard-killed goes into attempts.jsonl as `killed`."""
    import time

    marker = unclosed_attempt(paths)
    if marker is None:
        return None
    rung = ladder[min(max(marker["rung"], 0), len(ladder) - 1)]
    started = marker.get("started")
    wall = round(time.time() - started, 2) if isinstance(started, (int, float)) and not isinstance(started, bool) else None
    record = record_attempt(paths, rung, "killed", error="the process ended without recording its end (SIGKILL, "
                            "node failure or the scheduler's kill after a signal)",
                            steps_done=max(0, last_step - marker["step0"]), wall_time_s=wall, peak_gpu_mem_gb=None,
                            job_id=marker.get("job_id"))
    close_attempt(paths)
    return record
