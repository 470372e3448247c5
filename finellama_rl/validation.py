"""Cross-field validation of a resolved Config: every failure is a ConfigError
naming the key and what to set instead (exit code 2 at the entry points)."""
from __future__ import annotations

from finellama_rl.config import (Algo, Config, ConfigError, DataSource, Device, HardwareConfig, TrainerConfig,
                                 derive_grad_accum, eval_num_examples, sequences_per_step, world_size)


def _positive(key: str, value: float, hint: str = "") -> None:
    if value is None or value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}{'; ' + hint if hint else ''}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(key, f"must be >= 0, got {value}")


def _validate_batch(t: TrainerConfig, hardware: HardwareConfig) -> None:
    for key in ("prompts_per_step", "num_generations", "micro_batch"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.algo == Algo.ppo and t.num_generations != 1:
        raise ConfigError("trainer.num_generations", f"PPO samples one completion per prompt; set trainer.num_generations=1 (got {t.num_generations})")
    if t.algo == Algo.grpo and t.num_generations < 2:
        raise ConfigError("trainer.num_generations", f"GRPO needs groups of at least 2 completions to compare (got {t.num_generations})")
    per_update = sequences_per_step(t)
    if t.algo == Algo.ppo:
        _positive("trainer.ppo.num_mini_batches", t.ppo.num_mini_batches)
        if per_update % t.ppo.num_mini_batches:
            raise ConfigError("trainer.ppo.num_mini_batches", f"must divide trainer.prompts_per_step={t.prompts_per_step}")
        per_update //= t.ppo.num_mini_batches
    devices = world_size(hardware)
    if per_update % (t.micro_batch * devices):
        raise ConfigError(
            "trainer.micro_batch",
            f"{per_update} sequences per update (prompts_per_step * num_generations) are not divisible by "
            f"micro_batch={t.micro_batch} x {devices} device(s); choose a micro_batch that divides {per_update // devices or per_update}",
        )
    if t.grad_accum is not None and t.grad_accum != derive_grad_accum(t, hardware):
        raise ConfigError("trainer.grad_accum", "is derived from prompts_per_step, num_generations and micro_batch; remove the override")


def _validate_trainer(t: TrainerConfig, hardware: HardwareConfig) -> None:
    _positive("trainer.learning_rate", t.learning_rate, "e.g. trainer.learning_rate=1e-5")
    _validate_batch(t, hardware)
    for key in ("max_prompt_tokens", "max_completion_tokens", "max_steps", "save_every", "keep_last", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    for key in ("warmup_steps", "eval_every", "beta", "weight_decay", "max_grad_norm"):
        _non_negative(f"trainer.{key}", getattr(t, key))
    if t.warmup_steps >= t.max_steps and t.warmup_steps:
        raise ConfigError("trainer.warmup_steps", f"must be < trainer.max_steps={t.max_steps}")
    _positive("trainer.temperature", t.temperature)
    if not 0 < t.top_p <= 1:
        raise ConfigError("trainer.top_p", f"must be in (0, 1], got {t.top_p}")
    if not 0 < t.clip_epsilon < 1:
        raise ConfigError("trainer.clip_epsilon", f"must be in (0, 1), got {t.clip_epsilon}")
    from finellama_rl.rewards.rules import REWARD_FUNCS

    if not t.rewards:
        raise ConfigError("trainer.rewards", f"needs at least one of {'|'.join(REWARD_FUNCS)}")
    for name in t.rewards:
        if name not in REWARD_FUNCS:
            raise ConfigError("trainer.rewards", f"unknown reward {name!r}: expected one of {'|'.join(REWARD_FUNCS)}")
    if t.reward_weights is not None and len(t.reward_weights) != len(t.rewards):
        raise ConfigError("trainer.reward_weights", f"needs one weight per reward ({len(t.rewards)}), got {len(t.reward_weights)}")
    if t.lora.enabled:
        _positive("trainer.lora.r", t.lora.r)
        _positive("trainer.lora.alpha", t.lora.alpha)
        if not 0 <= t.lora.dropout < 1:
            raise ConfigError("trainer.lora.dropout", f"must be in [0, 1), got {t.lora.dropout}")
        if "lm_head" in t.lora.target_modules:
            raise ConfigError("trainer.lora.target_modules", "LoRA on lm_head is not supported (TRL rejects it); remove lm_head")
    if t.quantization.enabled and not t.lora.enabled:
        raise ConfigError("trainer.lora.enabled", "a 4-bit base cannot be trained without LoRA; set trainer.lora.enabled=true or trainer.quantization.enabled=false")
    if t.algo == Algo.ppo:
        p = t.ppo
        _positive("trainer.ppo.epochs", p.epochs)
        _positive("trainer.ppo.vf_coef", p.vf_coef)
        for key in ("gamma", "lam"):
            if not 0 <= getattr(p, key) <= 1:
                raise ConfigError(f"trainer.ppo.{key}", f"must be in [0, 1], got {getattr(p, key)}")


def _validate_hardware(h: HardwareConfig) -> None:
    if h.device == Device.cuda:
        _positive("hardware.gpus_per_node", h.gpus_per_node)
        _positive("hardware.gpu_mem_gb", h.gpu_mem_gb)
    _positive("hardware.slurm.cpus_per_task", h.slurm.cpus_per_task)
    _positive("hardware.slurm.mem_gb", h.slurm.mem_gb)
    _positive("hardware.slurm.timeout_min", h.slurm.timeout_min)
    _non_negative("hardware.slurm.max_requeues", h.slurm.max_requeues)
    if h.slurm.signal_delay_s < 0 or h.slurm.signal_delay_s >= h.slurm.timeout_min * 60:
        raise ConfigError("hardware.slurm.signal_delay_s", f"must be in [0, timeout_min*60={h.slurm.timeout_min * 60})")


def validate(cfg: Config) -> None:
    """Cross-field checks on a resolved config. Raises ConfigError naming the key."""
    _validate_trainer(cfg.trainer, cfg.hardware)
    _validate_hardware(cfg.hardware)
    if cfg.trainer.quantization.enabled and cfg.hardware.bf16 and cfg.hardware.device == Device.cpu:
        raise ConfigError("hardware.bf16", "bf16 compute on CPU is not supported with a 4-bit base; use hardware=cpu")
    if cfg.model.tiny and cfg.data.source == DataSource.gsm8k and cfg.model.vocab_size < 256:
        raise ConfigError("model.vocab_size", "the tiny tokenizer needs at least 256 entries")
    eval_num_examples(cfg.eval.num_examples)
    _non_negative("eval.batch_size", cfg.eval.batch_size)
    _non_negative("eval.shots", cfg.eval.shots)
    _positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive("eval.samples", cfg.eval.samples, "1 = greedy only, k > 1 adds pass@k")
    _positive("eval.sample_temperature", cfg.eval.sample_temperature, "e.g. eval.sample_temperature=0.7")
    if cfg.data.source == DataSource.arithmetic:
        _positive("data.num_train", cfg.data.num_train)
        _positive("data.num_test", cfg.data.num_test)
    _validate_ladder(cfg)
    if cfg.debug.crash_after_step is not None and cfg.debug.crash_after_step % cfg.trainer.save_every:
        raise ConfigError("debug.crash_after_step", f"must be a multiple of trainer.save_every={cfg.trainer.save_every}")


def _validate_ladder(cfg: Config) -> None:
    lad = cfg.ladder
    _non_negative("ladder.start_rung", lad.start_rung)
    _non_negative("ladder.max_resubmits", lad.max_resubmits)
    _positive("ladder.min_completion_tokens", lad.min_completion_tokens)
    _positive("ladder.min_prompt_tokens", lad.min_prompt_tokens)
    if not 0 < lad.length_step < 1:
        raise ConfigError("ladder.length_step", f"must be in (0, 1), got {lad.length_step}")
    if not 0 <= lad.planner_margin < 1:
        raise ConfigError("ladder.planner_margin", f"must be in [0, 1), got {lad.planner_margin}")
