"""Validation of the frozen scoring models (reward_model, judge), their GPUs, trainer=rm and
the policy's quantization bits: every failure is a ConfigError naming the key (exit code 2),
raised while the config is checked, before any model loads or job is submitted.

Called by validation.validate(); the GPU split itself is config.derive_processes().
"""
from __future__ import annotations

from finellama_rl.config import Algo, Config, Device, JudgeConfig, RewardModelConfig, RewardModelKind, processes_per_node, scoring_gpus, scoring_sources
from finellama_rl.errors import ConfigError


def _positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _validate_gpu(cfg: Config, source: str, gpu: int) -> None:
    """A named GPU exists on the node and is not a training rank's own (unless it is the one GPU)."""
    key, hw = f"{source}.gpu", cfg.hardware
    if hw.device != Device.cuda:
        raise ConfigError(key, f"hardware={hw.name} has no GPUs; leave {key} unset (the policy's device)")
    if not 0 <= gpu < hw.gpus_per_node:
        raise ConfigError(key, f"GPU {gpu} is not on a node of hardware={hw.name} (gpus_per_node={hw.gpus_per_node}: "
                               f"GPUs 0..{hw.gpus_per_node - 1}); choose one of them or a profile with more GPUs, e.g. hardware=gpu24x2")
    ranks = processes_per_node(hw)  # the GPUs of the node that training processes use
    if gpu < ranks and ranks > 1:
        raise ConfigError(key, f"GPU {gpu} is training process {gpu}'s of {ranks} (data parallel on GPUs 0..{ranks - 1}); "
                               f"name a GPU >= {ranks} or set hardware.processes={max(1, gpu)}")


def _validate_reward_model(cfg: Config, rm: RewardModelConfig) -> None:
    if rm.model is None:
        raise ConfigError("reward_model.model", "trainer.rewards names reward_model but no reward model is configured; "
                                                "choose its architecture with model@reward_model.model=qwen2.5-1.5b (a conf/model option)")
    if not rm.path:
        raise ConfigError("reward_model.path", "trainer.rewards names reward_model: set reward_model.path=<a trainer=rm run "
                                               "folder, or a sequence-classification / PRM model folder>")
    if rm.kind == RewardModelKind.orm and rm.trust_remote_code:
        raise ConfigError("reward_model.trust_remote_code", "is for process reward models with their own code (kind=prm)")
    if rm.kind == RewardModelKind.prm and not rm.step_separator:
        raise ConfigError("reward_model.step_separator", "a process reward model needs a step separator, e.g. '\\n\\n'")


def _validate_judge(j: JudgeConfig) -> None:
    if j.model is None:
        raise ConfigError("judge.model", "trainer.rewards names judge but no judge model is configured; "
                                         "choose one with model@judge.model=qwen2.5-14b (a conf/model option)")
    _positive("judge.max_new_tokens", j.max_new_tokens)
    _positive("judge.max_input_tokens", j.max_input_tokens)


def _validate_rm_trainer(cfg: Config) -> None:
    r = cfg.trainer.rm
    if cfg.reward_model.kind != RewardModelKind.orm:
        raise ConfigError("reward_model.kind", "trainer=rm trains an outcome reward model; set reward_model.kind=orm")
    if not 0 < r.heldout_fraction < 1:
        raise ConfigError("trainer.rm.heldout_fraction", f"must be in (0, 1), got {r.heldout_fraction}")
    _positive("trainer.rm.samples_per_problem", r.samples_per_problem)
    _positive("trainer.rm.sample_temperature", r.sample_temperature)
    if r.corrupted_per_problem < 0:
        raise ConfigError("trainer.rm.corrupted_per_problem", f"must be >= 0, got {r.corrupted_per_problem}")
    if r.num_problems is not None and r.num_problems < 2:
        raise ConfigError("trainer.rm.num_problems", f"needs at least 2 problems (training and held-out), got {r.num_problems}")


def validate_scoring(cfg: Config) -> None:
    """Scoring sources named in trainer.rewards, their GPUs, trainer=rm, quantization bits."""
    if cfg.trainer.quantization.bits not in (4, 8):
        raise ConfigError("trainer.quantization.bits", f"must be 4 (NF4/FP4) or 8 (LLM.int8), got {cfg.trainer.quantization.bits}")
    sources = scoring_sources(cfg.trainer)
    if "reward_model" in sources:
        _validate_reward_model(cfg, cfg.reward_model)
    if "judge" in sources:
        _validate_judge(cfg.judge)
    for name in sources:
        section = getattr(cfg, name)
        _positive(f"{name}.batch_size", section.batch_size)
    _positive("reward_model.max_tokens", cfg.reward_model.max_tokens)
    for name, gpu in scoring_gpus(cfg).items():
        _validate_gpu(cfg, name, gpu)
    if cfg.trainer.algo == Algo.rm:
        _validate_rm_trainer(cfg)
