"""The OOM ladder: an ordered list of ever cheaper training settings.

Why: an out-of-memory crash on a SLURM GPU node costs a day of queue time per
resubmission. Instead of guessing a smaller batch by hand, the trainer walks a
ladder of settings in-process (catch OOM -> free memory -> next rung), and the
memory planner (``finellama_rl.login.memory.plan_rung``) picks the starting rung so
that the first attempt usually fits already.

The ladder keeps the experiment's meaning for as long as possible:

1. Batch rungs: shrink ``micro_batch`` and grow ``grad_accum`` so that the
   effective batch (sequences per optimizer step per device) is unchanged. The
   gradient is then the same up to floating point summation order.
2. One checkpointing rung: turn on activation checkpointing (same math, ~1/3
   more compute).
3. Length rungs (``changes_experiment=True``): cut ``max_completion_tokens``,
   then ``max_prompt_tokens``, by ``length_step`` per rung down to the floors.
   Truncating completions changes what the policy can learn, so the caller
   must report these rungs loudly.

After the last rung the caller gives up and reports.

The generation batch is a knob of its own (sequences per generate call), because
the phase that ran out decides what helps: ``step_down(ladder, rung, phase)`` cuts
the generation batch first after an out-of-memory in generation (halving it, down
to its floor), and walks the rungs above (micro batch first) after one in
training. It never walks a rung that cannot shrink the phase that ran out: after
a generation OOM at the floor it skips to the next rung whose generation is
smaller. A rung is therefore a point of a two-dimensional ladder: ``Rung.index``
is its position on the list above, and ``Rung.setting.generation_batch`` is its
generation batch: any size up to the rollout, in both trainers (GRPO scores the whole
step at once and chunks only its generate calls, and sampling is keyed per sequence,
so neither the gradient nor the samples depend on it).

This module is pure: no torch import; ``is_oom_error`` matches exception types by
name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

__all__ = [
    "Setting", "Rung", "Phase", "build_ladder", "next_rung", "rung_for_setting", "step_down",
    "generation_batches", "fit_generation_batch", "is_oom_error", "format_ladder",
]

LENGTH_MULTIPLE = 8  # cut lengths are multiples of 8 (tensor-core friendly shapes)


@dataclass(frozen=True)
class Setting:
    """The knobs the ladder may change (per device)."""

    micro_batch: int  # sequences per device per forward/backward
    grad_accum: int  # micro batches per optimizer step
    num_generations: int  # GRPO group size (1 for PPO)
    max_prompt_tokens: int
    max_completion_tokens: int
    activation_checkpointing: bool
    generation_batch: int = 0  # sequences per generate call per device; 0 = the whole rollout
    rollout_batch: int = 0  # sequences generated per step per device; 0 = effective_batch

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def rollout(self) -> int:
        return self.rollout_batch or self.effective_batch

    @property
    def generation(self) -> int:
        """Sequences per generate call (0 means the whole rollout)."""
        return self.generation_batch or self.rollout

    @property
    def generation_cost(self) -> int:
        """What the generation phase's memory grows with: sequences x length (KV cache)."""
        return self.generation * self.max_seq_len

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_tokens + self.max_completion_tokens


@dataclass(frozen=True)
class Rung:
    index: int  # position on the ladder list (batch, checkpointing, length rungs)
    setting: Setting  # its generation_batch may be cut below the list's (step_down)
    changes_experiment: bool  # True once a length was cut (this rung or earlier)
    description: str  # what changed versus the previous rung


class Phase:
    """Where an out-of-memory happened (attempts.jsonl `phase`). Plain strings so the
    job side can record them without importing anything."""

    generation = "generation"  # sampling completions (KV cache): the generation batch
    scoring = "scoring"  # no-grad log-prob/value passes at micro-batch size
    training = "training"  # forward/backward of a micro batch
    optimizer = "optimizer"  # clipping and the optimizer step
    eval = "eval"  # evaluation during or after training
    other = "other"  # anything else (loading, checkpoint writes)
    ALL = (generation, scoring, training, optimizer, eval, other)


def _validate_start(start: Setting, min_completion_tokens: int, min_prompt_tokens: int,
                    length_step: float) -> None:
    for name in ("micro_batch", "grad_accum", "num_generations", "max_prompt_tokens",
                 "max_completion_tokens"):
        value = getattr(start, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Setting.{name} must be a positive int, got {value!r}")
    if start.effective_batch % start.num_generations:
        raise ValueError(
            f"effective batch {start.effective_batch} (micro_batch {start.micro_batch} x grad_accum "
            f"{start.grad_accum}) must be divisible by num_generations {start.num_generations}")
    if start.rollout_batch and start.rollout_batch % start.effective_batch:
        raise ValueError(f"rollout_batch {start.rollout_batch} must be a multiple of the effective batch "
                         f"{start.effective_batch}")
    if start.generation_batch and start.generation_batch not in generation_batches(start):
        raise ValueError(f"generation_batch {start.generation_batch} is not a valid generation batch of {start}")
    if min_completion_tokens < 1 or min_prompt_tokens < 1:
        raise ValueError("length floors must be >= 1")
    if not 0.0 < length_step < 1.0:
        raise ValueError(f"length_step must be in (0, 1), got {length_step}")


def _next_micro_batch(micro_batch: int, effective_batch: int) -> int:
    """The largest divisor of ``effective_batch`` that is <= ceil(micro_batch / 2).

    For an even micro batch this is exactly micro_batch // 2 (it divides micro_batch,
    which divides the effective batch). For an odd micro batch a half does not exist;
    we take the largest divisor of the effective batch at or below ceil(m/2) (e.g.
    m=3, E=6 -> 2; m=5, E=10 -> 2; m=15, E=60 -> 6). Trap: "the largest divisor below
    m" would give tiny steps (m=15, E=60 -> 12 -> 10 -> 6 ...), each costing an OOM
    retry; bounding by ceil(m/2) keeps the batch phase at most ~log2(m) rungs.
    Keeping the result a divisor of E is what keeps E (and so GRPO group
    divisibility, E % num_generations == 0) exactly unchanged.
    """
    bound = (micro_batch + 1) // 2
    for candidate in range(bound, 0, -1):
        if effective_batch % candidate == 0:
            return candidate
    return 1  # unreachable: 1 divides everything


def _cut_length(current: int, floor: int, length_step: float) -> int:
    """current * length_step rounded DOWN to a multiple of 8, clamped to the floor.

    Strictly decreasing while current > floor: floor8(current * step) < current for
    step < 1, and a result below the floor (including 0 for tiny values) is clamped
    up to the floor, which is < current. A start already at or below its floor is
    never cut (lengths never grow).
    """
    cut = int(current * length_step) // LENGTH_MULTIPLE * LENGTH_MULTIPLE
    return max(floor, cut)


def generation_batches(s: Setting) -> List[int]:
    """Valid generation batches of `s`, ascending: 1..rollout, both trainers (issue 20:
    GRPO no longer needs whole micro batches or groups per generate call)."""
    return list(range(1, s.rollout + 1))


def fit_generation_batch(s: Setting, target: int) -> Setting:
    """`s` with the largest valid generation batch <= target (the smallest valid one if
    none is): a generation batch carried to another rung never exceeds its rollout."""
    if not s.generation_batch:
        return s
    return replace(s, generation_batch=max(1, min(target, s.rollout)))  # every batch of 1..rollout is valid


def _cut_generation(s: Setting) -> Optional[Setting]:
    """The largest valid generation batch <= ceil(G/2), or None at the floor."""
    current = s.generation  # every batch of 1..rollout is valid; ceil(G/2) < G from G = 2
    return replace(s, generation_batch=min((current + 1) // 2, s.rollout)) if current > 1 else None


def _batch_rungs(start: Setting) -> List[tuple]:
    out = []
    s = start
    while s.micro_batch > 1:
        eff = s.effective_batch
        m = _next_micro_batch(s.micro_batch, eff)
        nxt = fit_generation_batch(replace(s, micro_batch=m, grad_accum=eff // m), s.generation_batch)
        out.append((nxt, f"micro_batch {s.micro_batch}->{m}, grad_accum {s.grad_accum}->{nxt.grad_accum}"))
        s = nxt
    return out


def _length_rungs(start: Setting, min_completion: int, min_prompt: int,
                  length_step: float) -> List[tuple]:
    out = []
    s = start
    for field, floor in (("max_completion_tokens", min_completion), ("max_prompt_tokens", min_prompt)):
        while getattr(s, field) > floor:
            old = getattr(s, field)
            new = _cut_length(old, floor, length_step)
            s = replace(s, **{field: new})
            out.append((s, f"{field} {old}->{new} (changes experiment)"))
    return out


def build_ladder(start: Setting, min_completion_tokens: int, min_prompt_tokens: int,
                 length_step: float = 0.75) -> List[Rung]:
    """Rung 0 is ``start``; then batch rungs, a checkpointing rung, length rungs.

    Every rung differs from the previous one in exactly one phase's knobs, so no
    two rungs have equal settings (``rung_for_setting`` relies on that).
    """
    _validate_start(start, min_completion_tokens, min_prompt_tokens, length_step)
    steps = _batch_rungs(start)
    last = steps[-1][0] if steps else start
    if not last.activation_checkpointing:
        last = replace(last, activation_checkpointing=True)
        steps.append((last, "activation_checkpointing off->on"))
    steps += _length_rungs(last, min_completion_tokens, min_prompt_tokens, length_step)

    ladder = [Rung(0, start, False, "start")]
    changed = False
    for index, (setting, description) in enumerate(steps, start=1):
        # A length cut shows as a length differing from the start; once cut, it stays cut.
        changed = changed or setting.max_seq_len != start.max_seq_len
        ladder.append(Rung(index, setting, changed, description))
    return ladder


def next_rung(ladder: List[Rung], current_index: int) -> Optional[Rung]:
    """The rung after ``current_index``, or None at the end (the caller gives up)."""
    if not 0 <= current_index < len(ladder):
        raise IndexError(f"rung index {current_index} outside ladder of {len(ladder)} rungs")
    return ladder[current_index + 1] if current_index + 1 < len(ladder) else None


def step_down(ladder: List[Rung], current: Rung, phase: str) -> Optional[Rung]:
    """Where to retry after an out-of-memory in `phase` at `current` (None: give up).

    generation: cut the generation batch if it can shrink; else the next rung of the
    list whose generation is smaller (sequences x length). Any other phase: the next
    rung of the list (micro batch, checkpointing, lengths). The current generation
    batch is carried along (refitted to the new micro batch), never grown back.
    """
    if not 0 <= current.index < len(ladder):
        raise IndexError(f"rung index {current.index} outside ladder of {len(ladder)} rungs")
    if phase not in Phase.ALL:
        raise ValueError(f"unknown phase {phase!r}: expected one of {'|'.join(Phase.ALL)}")
    s = current.setting
    if phase == Phase.generation:
        cut = _cut_generation(s)
        if cut is not None:
            return Rung(current.index, cut, current.changes_experiment,
                        f"generation_batch {s.generation}->{cut.generation_batch}")
    for rung in ladder[current.index + 1:]:
        target = s.generation_batch or rung.setting.generation_batch
        carried = fit_generation_batch(rung.setting, target) if target else rung.setting
        if phase == Phase.generation and carried.generation_cost >= s.generation_cost:
            continue  # cannot shrink the phase that ran out
        description = rung.description + (f", generation_batch {carried.generation_batch}"
                                           if carried.generation_batch != rung.setting.generation_batch else "")
        return Rung(rung.index, carried, rung.changes_experiment, description)
    return None


def rung_for_setting(ladder: List[Rung], setting: Setting) -> int:
    """Index of the rung whose setting equals ``setting`` (resume at a remembered rung).

    Raises ValueError when absent: e.g. the config changed between submissions, so
    the remembered rung belongs to another ladder and must not be silently reused.
    """
    for rung in ladder:
        if rung.setting == setting:
            return rung.index
    raise ValueError(f"setting {setting} is not on this ladder (did the config change?)")


_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError"})  # torch.OutOfMemoryError == torch.cuda.OutOfMemoryError
# Lower-cased substrings of RuntimeError messages. "can't allocate memory" is PyTorch's
# host allocator (DefaultCPUAllocator), which raises RuntimeError, not MemoryError.
_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                 "can't allocate memory")


def _is_oom_single(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):  # host RAM
        return True
    # Match by class name along the MRO so torch need not be imported here.
    if any(cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(pattern in message for pattern in _OOM_MESSAGES)
    return False


def is_oom_error(exc: BaseException) -> bool:
    """True for GPU/host out-of-memory errors, also when re-raised ``from`` one.

    Follows ``__cause__`` (explicit ``raise X from oom``) but NOT ``__context__``:
    an unrelated error raised while handling an OOM must not be retried as one.
    """
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if _is_oom_single(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def format_ladder(ladder: List[Rung]) -> str:
    """A fixed-width table for logs, one line per rung."""
    header = (f"{'rung':>4} {'micro':>5} {'accum':>5} {'eff':>5} {'G':>3} {'gen':>5} {'prompt':>6} "
              f"{'compl':>5} {'seq':>5} {'ckpt':>4} {'changes':>7}  description")
    lines = [header, "-" * len(header)]
    for r in ladder:
        s = r.setting
        lines.append(
            f"{r.index:>4} {s.micro_batch:>5} {s.grad_accum:>5} {s.effective_batch:>5} "
            f"{s.num_generations:>3} {s.generation:>5} {s.max_prompt_tokens:>6} {s.max_completion_tokens:>5} "
            f"{s.max_seq_len:>5} {'on' if s.activation_checkpointing else 'off':>4} "
            f"{'YES' if r.changes_experiment else 'no':>7}  {r.description}")
    return "\n".join(lines)
