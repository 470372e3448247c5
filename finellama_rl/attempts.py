"""The job side of the OOM ladder: attempts.jsonl (one line per attempt), the rung
an attempt starts at, and deterministic fault injection so the ladder is
exercised on CPU. The ladder of a config is in rungs.py, the fit memory in fitmem.py.

Used by finellama_rl.train (in-process ladder) and finellama_rl.resubmit
(scheduler-level ladder). No torch at import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from finellama_rl.config import Config
from finellama_rl.ladder import Rung
from finellama_rl.results import RunPaths, append_jsonl, read_jsonl

OOM_OUTCOMES = ("oom", "oom_killed")


def read_attempts(paths: RunPaths) -> List[Dict[str, Any]]:
    return read_jsonl(paths.attempts)


def record_attempt(paths: RunPaths, rung: Rung, outcome: str, **fields: Any) -> Dict[str, Any]:
    s = rung.setting
    record = {"attempt": len(read_attempts(paths)) + 1, "rung": rung.index, "micro_batch": s.micro_batch,
              "grad_accum": s.grad_accum, "max_prompt_tokens": s.max_prompt_tokens,
              "max_completion_tokens": s.max_completion_tokens, "activation_checkpointing": s.activation_checkpointing,
              "changes_experiment": rung.changes_experiment, "outcome": outcome, **fields}
    append_jsonl(paths.attempts, record)
    return record


def start_rung(cfg: Config, paths: RunPaths, ladder: List[Rung]) -> int:
    """Where this attempt starts: after the last OOM, at the last rung otherwise."""
    rung = min(cfg.ladder.start_rung, len(ladder) - 1)
    attempts = read_attempts(paths)
    if attempts:
        last = attempts[-1]
        after = last["rung"] + 1 if last["outcome"] in OOM_OUTCOMES else last["rung"]
        rung = max(rung, min(after, len(ladder)))
    return rung


def format_attempts(attempts: List[Dict[str, Any]]) -> str:
    lines = ["attempt rung micro x accum  prompt/completion ckpt outcome      steps  error"]
    for a in attempts:
        lines.append(f"{a['attempt']:>7} {a['rung']:>4} {a['micro_batch']:>5} x {a['grad_accum']:<5} "
                     f"{a['max_prompt_tokens']:>6}/{a['max_completion_tokens']:<10} {str(a['activation_checkpointing'])[0]:>4} "
                     f"{a['outcome']:<12} {a.get('steps_done', '?'):>5}  {str(a.get('error', ''))[:60]}")
    return "\n".join(lines)


# -------------------------------------------------------------- fault injection


class FaultInjector:
    """Forward pre-hook: a real torch.OutOfMemoryError when a training forward
    (grad enabled) holds more tokens than `oom_above_tokens`, and host RAM held per
    micro-batch sequence. Deterministic, so ladder tests run on CPU."""

    def __init__(self, oom_above_tokens: Optional[int], host_mb_per_sequence: int):
        self.oom_above_tokens = oom_above_tokens
        self.host_mb = host_mb_per_sequence
        self._held: Optional[bytearray] = None

    def __call__(self, module, args, kwargs):
        import torch

        ids = args[0] if args else kwargs.get("input")  # (B, T) token ids entering the embedding
        if ids is None or not torch.is_grad_enabled():
            return None
        if self.host_mb:
            self._held = None
            held = bytearray(ids.shape[0] * self.host_mb * 1024 * 1024)
            held[::4096] = b"\x01" * len(held[::4096])  # touch every page so it is resident
            self._held = held
        if self.oom_above_tokens is not None and ids.numel() > self.oom_above_tokens:
            raise torch.OutOfMemoryError(
                f"simulated out of memory: a forward of {tuple(ids.shape)} = {ids.numel()} tokens "
                f"exceeds debug.oom_above_tokens={self.oom_above_tokens}")
        return None


def install_fault_injection(policy, cfg: Config) -> None:
    d = cfg.debug
    if d.oom_above_tokens is None and not d.host_mem_mb_per_sequence:
        return
    # The input embedding sees every forward, whichever wrapper (PEFT, HF, our PPO) calls it.
    policy.get_input_embeddings().register_forward_pre_hook(
        FaultInjector(d.oom_above_tokens, d.host_mem_mb_per_sequence), with_kwargs=True)
