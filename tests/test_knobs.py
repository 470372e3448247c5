"""One meaning per knob (issue 10): the settings PPO and GRPO would read differently are
rejected with a message that names the knob to use, and every TrainerConfig field says
what it means for each trainer."""
from __future__ import annotations

import dataclasses

import pytest

from finellama_rl.compose import load_config
from finellama_rl.config import TrainerConfig
from finellama_rl.errors import ConfigError

SMOKE = ["experiment=smoke"]


@pytest.mark.parametrize("overrides, key, words", [
    (["trainer=ppo", "trainer.beta=0.05"], "trainer.beta", "trainer.ppo.kl_coef"),
    (["trainer=ppo", "trainer.top_p=0.9"], "trainer.top_p", "must be 1 for PPO"),
    (["trainer=ppo", "trainer.num_iterations=2"], "trainer.num_iterations", "trainer.ppo.epochs"),
    (["trainer=ppo", "trainer.lora.dropout=0.05"], "trainer.lora.dropout", "must be 0"),
    (["trainer=grpo", "trainer.lora.dropout=0.05"], "trainer.lora.dropout", "must be 0"),
    (["trainer=grpo", "trainer.num_iterations=0"], "trainer.num_iterations", "> 0"),
    (["trainer=ppo", "trainer.generation_batch=-1"], "trainer.generation_batch", ">= 0"),
    (["trainer=grpo", "trainer.loss_type=bnpo"], "trainer.loss_type", "use dapo"),
    (["trainer=ppo", "trainer.advantage_scaling=group"], "trainer.advantage_scaling", "use batch"),
    (["trainer=ppo", "trainer.loss_type=grpo"], "trainer.loss_type", "leave trainer.loss_type=dapo"),
    (["trainer=grpo", "trainer.truncation_penalty=-1"], "trainer.truncation_penalty", ">= 0"),
    (["trainer=ppo", "trainer.truncation=penalty", "trainer.truncation_penalty=-0.5"], "trainer.truncation_penalty", ">= 0"),
])
def test_conflicting_knobs_are_rejected(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config([*SMOKE, *overrides], resolve_paths=False)
    assert err.value.key == key and words in err.value.message


def test_accepted_settings():
    g = load_config([*SMOKE, "trainer=grpo", "trainer.generation_batch=8", "trainer.num_iterations=2",
                     "trainer.top_p=0.9", "trainer.beta=0.04"], resolve_paths=False).trainer
    assert (g.generation_batch, g.num_iterations, g.beta, g.lora.dropout) == (8, 2, 0.04, 0.0)
    # issue 20: any GRPO generation batch (no whole micro batches or groups per generate call)
    odd = load_config([*SMOKE, "trainer=grpo", "trainer.generation_batch=3"], resolve_paths=False).trainer
    assert odd.generation_batch == 3 and odd.micro_batch == 4 and odd.num_generations == 8
    p = load_config([*SMOKE, "trainer=ppo", "trainer.generation_batch=3"], resolve_paths=False).trainer
    assert p.generation_batch == 3 and p.ppo.kl_coef == 0.05 and p.beta == 0.0 and p.warmup_steps == 0


def test_grpo_config_maps_generation_batch_and_iterations():
    from finellama_rl.trainers.grpo import build_grpo_config

    cfg = load_config([*SMOKE, "trainer=grpo", "trainer.prompts_per_step=4", "trainer.num_generations=8",
                       "trainer.micro_batch=4", "trainer.generation_batch=16", "trainer.num_iterations=2",
                       "trainer.warmup_steps=3"], resolve_paths=False)
    args = build_grpo_config(cfg, "/tmp/unused")
    # issue 20: TRL scores the whole step in one call (its dapo token count and reward statistics cover the
    # step); trainer.generation_batch only chunks the generate() calls inside it (Trainer._generate_single_turn)
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.generation_batch_size) == (8, 8, 32)
    assert args.num_iterations == 2 and args.warmup_steps == 3
    assert (args.top_k, args.repetition_penalty) == (0, 1.0)  # explicit, whatever the model's generation_config says


def test_ppo_warmup_counts_global_steps(make_config):
    """Both trainers count trainer.warmup_steps in global steps; PPO's scheduler runs in
    optimizer steps (epochs x mini-batches per global step)."""
    from _trainctx import build_ctx

    from finellama_rl.trainers import ppo

    cfg = make_config(*SMOKE, "trainer=ppo", "trainer.prompts_per_step=8", "trainer.micro_batch=4",
                      "trainer.warmup_steps=2", "trainer.max_steps=8", "trainer.ppo.epochs=2",
                      "trainer.ppo.num_mini_batches=2", "trainer.lr_schedule=linear", "trainer.learning_rate=1.0")
    state = ppo.build_state(build_ctx(cfg).policy, cfg.trainer)
    lrs = []
    for _ in range(8 * 4):  # 8 global steps x 4 optimizer steps
        lrs.append(state.scheduler.get_last_lr()[0])
        state.optimizer.step()
        state.scheduler.step()
    assert lrs[:8] == pytest.approx([i / 8 for i in range(8)])  # warmup = 2 global steps = 8 optimizer steps
    assert lrs.index(max(lrs)) == 8 and max(lrs) == pytest.approx(1.0)


def test_every_trainer_field_is_documented_for_each_trainer():
    import ast
    import inspect

    import finellama_rl.config as config

    tree = ast.parse(inspect.getsource(config))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainerConfig")
    documented, body = set(), cls.body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            documented.add(a.target.id)
    nested = {f.name for f in dataclasses.fields(TrainerConfig)  # lora, ppo, ...: their fields have their own docs
              if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}
    scalar = [f.name for f in dataclasses.fields(TrainerConfig) if f.name not in nested]
    missing = [name for name in scalar if name not in documented]
    assert not missing, f"TrainerConfig fields without a doc line: {missing}"


def test_step_sleep_gives_each_step_a_known_wall_time_and_a_signal_meanwhile_still_stops(make_config, tmp_path):
    """debug.step_sleep_s (the SLURM time-limit tests' clock): decide() waits that long, a stop
    requested during the wait (a signal handler) is honoured at that step; without it no wait;
    a negative value is refused naming the key."""
    import threading
    import time

    from finellama_rl.errors import ConfigError
    from finellama_rl.job.monitor import TrainingMonitor
    from finellama_rl.results import RunPaths

    cfg = make_config("experiment=smoke", "debug.step_sleep_s=0.3")
    paths = RunPaths(tmp_path / "run").make()
    slow = TrainingMonitor(cfg.trainer, paths, 0, "t", step_sleep_s=cfg.debug.step_sleep_s, print_fn=lambda s: None)
    fast = TrainingMonitor(cfg.trainer, paths, 0, "t", print_fn=lambda s: None)
    fast.decide(1)  # the first call imports what it asks (torch.distributed)
    t0 = time.monotonic()
    assert not fast.decide(1).stop and time.monotonic() - t0 < 0.2
    t0 = time.monotonic()
    assert not slow.decide(1).stop and time.monotonic() - t0 >= 0.3
    threading.Timer(0.1, slow.request_stop, args=("SIGUSR2",)).start()
    decision = slow.decide(2)
    assert decision.stop and decision.save and decision.reason == "SIGUSR2"
    with pytest.raises(ConfigError, match="debug.step_sleep_s"):
        make_config("experiment=smoke", "debug.step_sleep_s=-1")


# ------------------------------------------------------------- the loss family (issue 20)


def _sweep(tmp_path, *overrides):
    from finellama_rl.login import sweep

    return sweep.plan_runs(["-m", *SMOKE, *overrides, f"run.results_dir={tmp_path}"])


def test_a_loss_type_sweep_composes_into_one_trl_loss_per_run(tmp_path):
    from finellama_rl.trainers.grpo import build_grpo_config

    runs = _sweep(tmp_path, "trainer=grpo", "trainer.loss_type=grpo,dr_grpo,dapo")
    assert [build_grpo_config(r.cfg, "/tmp/unused").loss_type for r in runs] == ["grpo", "dr_grpo", "dapo"]
    assert len({r.cfg.run.dir for r in runs}) == 3


def test_advantage_scaling_and_truncation_compose_for_both_trainers(tmp_path):
    """The same two knobs, the same names, in both trainers; GRPO maps them to TRL."""
    from finellama_rl.trainers.grpo import build_grpo_config, reward_weights

    grpo = _sweep(tmp_path / "g", "trainer=grpo", "trainer.advantage_scaling=group,batch,none",
                  "trainer.truncation=none,mask,penalty")
    ppo = _sweep(tmp_path / "p", "trainer=ppo", "trainer.advantage_scaling=batch,none", "trainer.truncation=none,mask,penalty",
                 "trainer.truncation_penalty=0.5")
    assert len(grpo) == 9 and len(ppo) == 6
    for r in grpo:
        t, args = r.cfg.trainer, build_grpo_config(r.cfg, "/tmp/unused")
        assert args.scale_rewards == t.advantage_scaling.value  # TRL's names: group | batch | none
        assert args.mask_truncated_completions == (t.truncation.value == "mask")
    assert {(r.cfg.trainer.advantage_scaling.value, r.cfg.trainer.truncation.value) for r in ppo} == {
        (a, b) for a in ("batch", "none") for b in ("none", "mask", "penalty")}
    assert {r.cfg.trainer.truncation_penalty for r in ppo} == {0.5}
    weighted = load_config([*SMOKE, "trainer=grpo", "trainer.truncation=penalty", "trainer.rewards=[correctness,format]",
                            "trainer.reward_weights=[1.0,0.5]"], resolve_paths=False).trainer
    assert reward_weights(weighted) == [1.0, 0.5, 1.0]  # the penalty's own reward function, weight 1


def test_the_defaults_of_each_trainer(tmp_path):
    g = load_config([*SMOKE, "trainer=grpo"], resolve_paths=False).trainer
    p = load_config([*SMOKE, "trainer=ppo"], resolve_paths=False).trainer
    assert (g.loss_type.value, g.advantage_scaling.value, g.truncation.value) == ("dapo", "group", "none")
    assert (p.advantage_scaling.value, p.truncation.value, p.truncation_penalty) == ("batch", "none", 1.0)


def test_the_old_whitening_key_says_what_replaced_it():
    with pytest.raises(ConfigError) as err:
        load_config([*SMOKE, "trainer=ppo", "trainer.ppo.whiten_advantages=false"], resolve_paths=False)
    assert err.value.key == "trainer.ppo.whiten_advantages" and "trainer.advantage_scaling=batch" in err.value.message


@pytest.mark.parametrize("args, key", [(["trainer=grpo", "trainer.loss_type=bnpo"], "trainer.loss_type"),
                                       (["trainer=ppo", "trainer.advantage_scaling=group"], "trainer.advantage_scaling")])
def test_a_refused_combination_exits_2_before_any_model_loads(args, key, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "results" / "run"
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", *SMOKE, *args, f"run.results_dir={tmp_path / 'results'}",
                           f"run.dir={run}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {key}:")
    assert "policy:" not in proc.stdout + proc.stderr and not run.exists()  # nothing loaded, no run folder
