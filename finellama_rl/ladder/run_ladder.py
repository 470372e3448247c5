"""The OOM ladder of a run's config: its rung-0 setting, the ladder built from it,
and the config at a given rung. Pure (no torch): used by launch and plan on the
login node and by training and the job's controller on compute nodes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

from finellama_rl.config import Algo, Config, HardwareConfig, TrainerConfig, world_size
from finellama_rl.ladder.rungs import Rung, Setting, build_ladder


def setting_of(t: TrainerConfig, hardware: HardwareConfig) -> Setting:
    """Rung 0, per device. The generation batch is concrete: both trainers sample the
    step's sequences on a device (PPO: prompts_per_step / devices; GRPO: micro_batch x
    grad_accum) in chunks of it (a generation batch above the rollout is the rollout)."""
    rollout = 0
    if t.algo == Algo.ppo:
        rollout = t.prompts_per_step // world_size(hardware)
    elif t.algo == Algo.grpo:
        rollout = t.micro_batch * t.grad_accum
    generation = min(t.generation_batch or rollout, rollout) if rollout else 0
    return Setting(micro_batch=t.micro_batch, grad_accum=t.grad_accum, num_generations=t.num_generations,
                   max_prompt_tokens=t.max_prompt_tokens, max_completion_tokens=t.max_completion_tokens,
                   activation_checkpointing=t.activation_checkpointing, generation_batch=generation,
                   rollout_batch=rollout)


def ladder_for(cfg: Config) -> List[Rung]:
    """The ladder from the configured (rung 0) setting."""
    t, lad = cfg.trainer, cfg.ladder
    start = setting_of(t, cfg.hardware)  # per device: grad_accum is already derived per device
    return build_ladder(start, min(lad.min_completion_tokens, t.max_completion_tokens),
                        min(lad.min_prompt_tokens, t.max_prompt_tokens), lad.length_step)


def config_at(cfg: Config, rung: Rung) -> Config:
    s = rung.setting
    trainer = replace(cfg.trainer, micro_batch=s.micro_batch, grad_accum=s.grad_accum,
                      max_prompt_tokens=s.max_prompt_tokens, max_completion_tokens=s.max_completion_tokens,
                      activation_checkpointing=s.activation_checkpointing,
                      generation_batch=s.generation_batch if s.rollout_batch else cfg.trainer.generation_batch)
    return replace(cfg, trainer=trainer)
