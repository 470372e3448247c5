"""Tests for finellama_rl.ladder.rungs: invariants over seeded random starts, a
hand-checked ladder, OOM classification and resume-by-setting."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finellama_rl.ladder.rungs import (
    Rung, Setting, build_ladder, format_ladder, is_oom_error, next_rung, rung_for_setting,
)

N_RANDOM = 300


def _random_case(rng: random.Random):
    """A valid random start (E divisible by G) and floors at or below the start lengths."""
    while True:
        g = rng.choice([1, 2, 4, 8, 16])
        m = rng.randint(1, 64)
        accums = [a for a in range(1, 33) if (m * a) % g == 0]
        if accums:
            break
    prompt, completion = rng.randint(64, 2048), rng.randint(64, 2048)
    start = Setting(m, rng.choice(accums), g, prompt, completion, rng.random() < 0.25)
    floor_c = rng.randint(8, completion)
    floor_p = rng.randint(8, prompt)
    step = rng.choice([0.5, 0.6, 0.75, 0.9])
    return start, floor_c, floor_p, step


def _kind(prev: Setting, cur: Setting) -> str:
    """Which single phase changed between two consecutive rungs."""
    changed = {f for f in ("micro_batch", "grad_accum", "activation_checkpointing",
                           "max_completion_tokens", "max_prompt_tokens", "num_generations")
               if getattr(prev, f) != getattr(cur, f)}
    kinds = {
        frozenset({"micro_batch", "grad_accum"}): "batch",
        frozenset({"activation_checkpointing"}): "ckpt",
        frozenset({"max_completion_tokens"}): "completion",
        frozenset({"max_prompt_tokens"}): "prompt",
    }
    assert frozenset(changed) in kinds, f"unexpected change set {changed}"
    return kinds[frozenset(changed)]


def _check_ladder(start: Setting, floor_c: int, floor_p: int, step: float) -> None:
    ladder = build_ladder(start, floor_c, floor_p, step)
    assert ladder[0].setting == start and ladder[0].index == 0
    assert not ladder[0].changes_experiment
    assert [r.index for r in ladder] == list(range(len(ladder)))
    eff = start.effective_batch
    kinds = []
    for prev, cur in zip(ladder, ladder[1:]):
        p, c = prev.setting, cur.setting
        assert c.effective_batch == eff
        assert c.effective_batch % c.num_generations == 0
        assert c.num_generations == start.num_generations
        assert c.micro_batch <= p.micro_batch
        assert c.max_completion_tokens <= p.max_completion_tokens
        assert c.max_prompt_tokens <= p.max_prompt_tokens
        assert c.max_completion_tokens >= floor_c and c.max_prompt_tokens >= floor_p
        kind = _kind(p, c)
        kinds.append(kind)
        if kind == "batch":  # at least a halving, so the batch phase stays short
            assert c.micro_batch <= (p.micro_batch + 1) // 2
        if kind in ("completion", "prompt"):
            field = "max_completion_tokens" if kind == "completion" else "max_prompt_tokens"
            new, old, floor = getattr(c, field), getattr(p, field), (floor_c if kind == "completion" else floor_p)
            assert new == floor or (new % 8 == 0 and new <= old * step)
        assert cur.changes_experiment == (kind in ("completion", "prompt") or prev.changes_experiment)
        assert cur.description
    order = {"batch": 0, "ckpt": 1, "completion": 2, "prompt": 3}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds), kinds
    assert kinds.count("ckpt") == (0 if start.activation_checkpointing else 1)
    for rung in ladder:  # experiment unchanged exactly until the first length cut
        assert rung.changes_experiment == (rung.setting.max_seq_len != start.max_seq_len)
    last = ladder[-1].setting
    assert last.micro_batch == 1 and last.grad_accum == eff and last.activation_checkpointing
    assert last.max_completion_tokens == floor_c and last.max_prompt_tokens == floor_p
    assert next_rung(ladder, len(ladder) - 1) is None
    assert len({r.setting for r in ladder}) == len(ladder)
    for rung in ladder:
        assert rung_for_setting(ladder, rung.setting) == rung.index


def test_random_ladders_keep_invariants():
    rng = random.Random(20240611)
    for _ in range(N_RANDOM):
        _check_ladder(*_random_case(rng))


def test_hand_checked_ladder():
    start = Setting(8, 2, 4, 256, 256, False)
    ladder = build_ladder(start, min_completion_tokens=64, min_prompt_tokens=128)
    got = [(r.setting.micro_batch, r.setting.grad_accum, r.setting.activation_checkpointing,
            r.setting.max_completion_tokens, r.setting.max_prompt_tokens, r.changes_experiment)
           for r in ladder]
    assert got == [
        (8, 2, False, 256, 256, False),
        (4, 4, False, 256, 256, False),
        (2, 8, False, 256, 256, False),
        (1, 16, False, 256, 256, False),
        (1, 16, True, 256, 256, False),
        (1, 16, True, 192, 256, True),   # 256*0.75
        (1, 16, True, 144, 256, True),   # 192*0.75
        (1, 16, True, 104, 256, True),   # 108 -> multiple of 8
        (1, 16, True, 72, 256, True),    # 78 -> 72
        (1, 16, True, 64, 256, True),    # 54 -> 48, clamped to the floor 64
        (1, 16, True, 64, 192, True),
        (1, 16, True, 64, 144, True),
        (1, 16, True, 64, 128, True),    # 108 -> 104, clamped to the floor 128
    ]
    assert ladder[1].description == "micro_batch 8->4, grad_accum 2->4"
    assert ladder[4].description == "activation_checkpointing off->on"


def test_odd_micro_batch_steps_to_divisors_of_effective_batch():
    ladder = build_ladder(Setting(15, 4, 4, 128, 128, True), 128, 128)
    assert [r.setting.micro_batch for r in ladder] == [15, 6, 3, 2, 1]
    assert all(r.setting.effective_batch == 60 for r in ladder)
    ladder = build_ladder(Setting(3, 2, 2, 128, 128, True), 128, 128)
    assert [(r.setting.micro_batch, r.setting.grad_accum) for r in ladder] == [(3, 2), (2, 3), (1, 6)]


def test_already_minimal_start_has_one_rung():
    ladder = build_ladder(Setting(1, 4, 2, 64, 64, True), 64, 64)
    assert len(ladder) == 1 and next_rung(ladder, 0) is None


def test_start_below_floor_is_never_lengthened():
    ladder = build_ladder(Setting(2, 1, 1, 100, 40, False), 64, 128)
    assert all(r.setting.max_completion_tokens == 40 and r.setting.max_prompt_tokens == 100 for r in ladder)
    assert not any(r.changes_experiment for r in ladder)


@pytest.mark.parametrize("kwargs", [
    dict(start=Setting(6, 1, 4, 64, 64, False), min_completion_tokens=8, min_prompt_tokens=8),  # 6 % 4
    dict(start=Setting(0, 1, 1, 64, 64, False), min_completion_tokens=8, min_prompt_tokens=8),
    dict(start=Setting(4, 1, 1, 64, 64, False), min_completion_tokens=0, min_prompt_tokens=8),
    dict(start=Setting(4, 1, 1, 64, 64, False), min_completion_tokens=8, min_prompt_tokens=8, length_step=1.0),
])
def test_invalid_starts_raise(kwargs):
    with pytest.raises(ValueError):
        build_ladder(**kwargs)


def test_next_rung_and_bounds():
    ladder = build_ladder(Setting(4, 1, 1, 64, 64, False), 64, 64)
    assert next_rung(ladder, 0) == ladder[1]
    with pytest.raises(IndexError):
        next_rung(ladder, len(ladder))


def test_rung_for_setting_round_trip_and_unknown():
    ladder = build_ladder(Setting(32, 2, 8, 512, 1024, False), 128, 256)
    for rung in ladder:
        assert rung_for_setting(ladder, rung.setting) == rung.index
        assert ladder[rung_for_setting(ladder, rung.setting)] is rung
    with pytest.raises(ValueError):
        rung_for_setting(ladder, Setting(3, 1, 1, 512, 1024, False))


def test_is_oom_error_classification():
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom_error(MemoryError())
    assert is_oom_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: "
                                     "can't allocate memory: you tried to allocate 8589934592 bytes."))
    assert not is_oom_error(ValueError("x"))
    assert not is_oom_error(ValueError("out of memory"))  # only RuntimeError messages count
    assert not is_oom_error(RuntimeError("size mismatch"))
    assert not is_oom_error(KeyboardInterrupt())


def test_is_oom_error_follows_cause_not_context():
    try:
        try:
            raise torch.OutOfMemoryError("x")
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("rollout failed") from oom
    except RuntimeError as wrapped:
        assert is_oom_error(wrapped)
    try:
        try:
            raise torch.OutOfMemoryError("x")
        except torch.OutOfMemoryError:
            raise KeyError("bug in the handler")
    except KeyError as unrelated:
        assert not is_oom_error(unrelated)


def test_format_ladder_has_one_line_per_rung():
    ladder = build_ladder(Setting(8, 2, 4, 256, 256, False), 64, 128)
    text = format_ladder(ladder)
    assert len(text.splitlines()) == len(ladder) + 2
    assert "YES" in text and "micro_batch 8->4" in text


def test_rungs_are_frozen():
    rung = build_ladder(Setting(2, 1, 1, 64, 64, False), 64, 64)[0]
    assert isinstance(rung, Rung)
    with pytest.raises(Exception):
        rung.index = 3  # type: ignore[misc]


def test_modules_do_not_import_torch():
    code = ("import sys; import finellama_rl.ladder.rungs, finellama_rl.login.memory; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    repo_root = Path(__file__).resolve().parents[1]  # `-c` puts the cwd on sys.path
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root).returncode == 0


# ------------------------------------------------- generation batch and step_down


def _ppo(m=4, accum=2, minibatches=2, gen=0, ckpt=False):
    """A PPO-like setting: rollout = effective batch x mini-batches, any generation batch."""
    eff = m * accum
    return Setting(m, accum, 1, 128, 128, ckpt, generation_batch=gen or eff * minibatches,
                   rollout_batch=eff * minibatches)


def _grpo(m=4, accum=8, g=8, gen=0):
    return Setting(m, accum, g, 128, 128, False, generation_batch=gen or m * accum, rollout_batch=m * accum)


def test_generation_batches_ppo_and_grpo():
    """Any size up to the rollout, both trainers: GRPO scores a step in one TRL call and
    only chunks its generate calls, and sampling is keyed per sequence (issue 20)."""
    from finellama_rl.ladder.rungs import generation_batches

    assert generation_batches(_ppo(m=2, accum=2, minibatches=2)) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert generation_batches(_grpo(m=4, accum=8, g=8)) == list(range(1, 33))
    assert generation_batches(_grpo(m=6, accum=4, g=4)) == list(range(1, 25))


def test_generation_oom_cuts_the_generation_batch_first_and_keeps_micro_batch():
    from finellama_rl.ladder.rungs import Phase, step_down

    ladder = build_ladder(_ppo(m=4, accum=2, minibatches=2), 64, 64)  # rollout 16
    rung, gens = ladder[0], []
    while rung is not None and rung.index == 0:
        gens.append(rung.setting.generation_batch)
        assert rung.setting.micro_batch == 4 and not rung.changes_experiment
        rung = step_down(ladder, rung, Phase.generation)
    assert gens == [16, 8, 4, 2, 1]
    # at the floor: batch and checkpointing rungs cannot shrink generation; the first
    # rung that does is a length cut, and it keeps the generation batch at 1
    assert rung.setting.max_completion_tokens < 128 and rung.setting.generation_batch == 1
    assert rung.index == next(r.index for r in ladder if r.setting.max_seq_len < 256)


def test_training_oom_cuts_the_micro_batch_and_keeps_the_generation_batch():
    from finellama_rl.ladder.rungs import Phase, step_down

    ladder = build_ladder(_ppo(m=4, accum=2, minibatches=2), 64, 64)
    r1 = step_down(ladder, ladder[0], Phase.training)
    assert (r1.index, r1.setting.micro_batch, r1.setting.generation_batch) == (1, 2, 16)
    cut = step_down(ladder, r1, Phase.generation)  # then a generation OOM: only the generation batch moves
    assert (cut.index, cut.setting.micro_batch, cut.setting.generation_batch) == (1, 2, 8)
    r2 = step_down(ladder, cut, Phase.optimizer)  # the cut generation batch is carried, never grown back
    assert (r2.index, r2.setting.micro_batch, r2.setting.generation_batch) == (2, 1, 8)
    assert "generation_batch 8" in r2.description


def test_grpo_generation_batch_halves_down_to_one_sequence_like_ppos():
    """Before issue 20 GRPO's cuts stopped at lcm(micro_batch, num_generations) = 8 here
    (TRL's generation batch); now the chunks inside one scoring call may be any size."""
    from finellama_rl.ladder.rungs import Phase, step_down

    ladder = build_ladder(_grpo(m=4, accum=8, g=8), 64, 64)
    rung, gens = ladder[0], []
    while rung.index == 0:
        gens.append(rung.setting.generation_batch)
        assert rung.setting.micro_batch == 4
        rung = step_down(ladder, rung, Phase.generation)
    assert gens == [32, 16, 8, 4, 2, 1]
    assert rung.setting.max_seq_len < 256 and rung.setting.generation_batch == 1


def test_step_down_exhaustive_invariants():
    """Random starts and random phase sequences: every step shrinks the knob of the phase
    that ran out (or the next rung's), keeps the effective batch and the groups, never grows
    the generation batch, and ends (None) after finitely many steps."""
    from finellama_rl.ladder.rungs import Phase, generation_batches, step_down

    rng = random.Random(7)
    for _ in range(300):
        grpo = rng.random() < 0.5
        g = rng.choice([2, 4, 8]) if grpo else 1
        m = rng.choice([1, 2, 3, 4, 6, 8, 16])
        accum = rng.choice([a for a in range(1, 9) if (m * a) % g == 0] or [g])
        eff = m * accum
        rollout = eff if grpo else eff * rng.choice([1, 2, 4])
        start = Setting(m, accum, g, rng.choice([64, 200]), rng.choice([64, 300]), rng.random() < 0.3,
                        generation_batch=rng.choice(generation_batches(Setting(m, accum, g, 8, 8, False, 0, rollout))),
                        rollout_batch=rollout)
        ladder = build_ladder(start, 64, 64)
        rung, steps = ladder[0], 0
        while rung is not None:
            phase = rng.choice(Phase.ALL)
            nxt = step_down(ladder, rung, phase)
            steps += 1
            assert steps < 200
            if nxt is None:
                break
            s, n = rung.setting, nxt.setting
            assert n.effective_batch == s.effective_batch and n.generation_batch in generation_batches(n)
            assert n.generation_batch <= s.generation_batch and nxt.index >= rung.index
            if phase == Phase.generation:
                assert n.generation_cost < s.generation_cost  # it shrank the phase that ran out
            else:
                assert nxt.index == rung.index + 1  # the next rung of the list
            rung = nxt


def test_start_point_after_an_oom_steps_by_phase(tmp_path):
    from finellama_rl.ladder.attempts import record_attempt, start_point
    from finellama_rl.compose import load_config
    from finellama_rl.ladder.rungs import Phase
    from finellama_rl.results import RunPaths
    from finellama_rl.ladder.run_ladder import ladder_for

    cfg = load_config(["experiment=smoke", "trainer=ppo", "trainer.prompts_per_step=8", "trainer.micro_batch=4",
                       f"run.dir={tmp_path}/results/r", f"run.results_dir={tmp_path}/results"])
    paths = RunPaths(tmp_path / "results" / "r").make()
    ladder = ladder_for(cfg)
    assert start_point(cfg.ladder, paths, ladder) == ladder[0] and ladder[0].setting.generation_batch == 8
    record_attempt(paths, ladder[0], "oom", phase=Phase.generation)
    after_gen = start_point(cfg.ladder, paths, ladder)
    assert (after_gen.index, after_gen.setting.generation_batch, after_gen.setting.micro_batch) == (0, 4, 4)
    record_attempt(paths, after_gen, "oom", phase=Phase.training)
    after_train = start_point(cfg.ladder, paths, ladder)
    assert (after_train.index, after_train.setting.generation_batch, after_train.setting.micro_batch) == (1, 4, 2)
    record_attempt(paths, after_train, "oom_killed")  # killed by the scheduler: phase unknown -> the list's next rung
    assert start_point(cfg.ladder, paths, ladder).index == 2
