"""The whole run schema: typed dataclasses, their Hydra registration, derived values
and validation.

Hydra composes `conf/` on top of the `schema` node registered here, so a misspelled
key or a wrong type fails at composition. The result becomes a `Config` dataclass
exactly once, in `load_config()`; below that no code sees a DictConfig. Cross-field
rules live in `validate()` (not `__post_init__`, which OmegaConf runs on the schema's
`???` defaults), and every failure is a `ConfigError` naming the key and the fix,
which the entry points turn into a short message and exit code 2.

Used by every entry point, e.g. `python -m finellama_rl.launch experiment=smoke`.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Dict, List, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A bad user setting: `key` names it, the message says what to set instead."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class Algo(str, Enum):
    # Member names equal their values: OmegaConf matches enum overrides by name.
    grpo = "grpo"
    ppo = "ppo"


class LossType(str, Enum):
    grpo = "grpo"
    dapo = "dapo"
    dr_grpo = "dr_grpo"
    bnpo = "bnpo"


class LRSchedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class QuantType(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class AttnImpl(str, Enum):
    auto = "auto"  # flash_attention_2 when flash_attn imports on CUDA, else sdpa
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    eager = "eager"


class DataSource(str, Enum):
    gsm8k = "gsm8k"
    arithmetic = "arithmetic"


class ValueHead(str, Enum):
    shared = "shared"  # linear head on the policy's last hidden state (one forward)
    adapter = "adapter"  # a second LoRA adapter on the shared 4-bit base


class Launcher(str, Enum):
    auto = "auto"  # slurm when sbatch is on PATH, else local
    local = "local"
    slurm = "slurm"


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name used in run names, e.g. qwen2.5-3b."""
    hub_id: str = MISSING
    """Hub id, e.g. Qwen/Qwen2.5-3B-Instruct (ignored when tiny or path is set)."""
    revision: str = "main"
    path: Optional[str] = None
    """A local model folder; takes precedence over hub_id."""
    tiny: bool = False
    """Build a random-init Qwen2-architecture model and tokenizer locally (no download)."""
    params_b: float = MISSING
    """Parameter count in billions (memory planning)."""
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    max_position_embeddings: int = 32768
    tie_embeddings: bool = True
    attn_implementation: AttnImpl = AttnImpl.auto


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class QuantizationConfig:
    enabled: bool = True
    """4-bit base through bitsandbytes; false trains the full-precision model."""
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True


@dataclass
class PPOConfig:
    epochs: int = 2
    """PPO epochs over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch; each accumulates micro batches of the rollout."""
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    clip_range_value: float = 0.2
    whiten_advantages: bool = True
    value_head: ValueHead = ValueHead.shared


@dataclass
class TrainerConfig:
    algo: Algo = MISSING
    learning_rate: float = 1e-5
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    prompts_per_step: int = 8
    """Prompts consumed per optimizer step (each sampled num_generations times)."""
    num_generations: int = 4
    """Completions per prompt (GRPO group size; 1 for PPO)."""
    micro_batch: int = 8
    """Sequences per device per forward/backward."""
    grad_accum: Optional[int] = None
    """Derived: prompts_per_step * num_generations / (micro_batch * devices). Do not set."""
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    """KL coefficient against the reference (the base with the adapter disabled)."""
    clip_epsilon: float = 0.2
    loss_type: LossType = LossType.dapo
    max_steps: int = 100
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 0
    """Evaluate every N steps during training; 0 = only before and after."""
    log_every: int = 1
    seed: int = 0
    activation_checkpointing: bool = False
    rewards: List[str] = field(default_factory=lambda: ["correctness", "format"])
    reward_weights: Optional[List[float]] = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 1440
    signal_delay_s: int = 120
    """SLURM sends USR2 this long before the time limit: save and requeue."""
    max_requeues: int = 3
    additional: Dict[str, str] = field(default_factory=dict)
    """Extra sbatch options, e.g. {mail-type: END}."""


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.cpu
    gpu_mem_gb: float = 0.0
    gpus_per_node: int = 0
    bf16: bool = False
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class DataConfig:
    source: DataSource = MISSING
    hub_id: str = "openai/gsm8k"
    hub_config: str = "main"
    path: Optional[str] = None
    """Local jsonl/parquet with question and answer columns (GSM8K `#### n` format)."""
    test_path: Optional[str] = None
    train_split: str = "train"
    test_split: str = "test"
    max_train_examples: Optional[int] = None
    num_train: int = 2000
    """Synthetic task only: training problems."""
    num_test: int = 200
    synthetic_seed: int = 1234
    max_operand: int = 20
    system_prompt: str = (
        "Solve the math problem step by step. End with a line '#### <number>' giving the final answer."
    )


@dataclass
class EvalConfig:
    num_examples: str = "50"
    """How many test problems: a positive integer or `all`."""
    max_new_tokens: int = 256
    batch_size: int = 0
    """0 = the run's micro batch."""
    shots: int = 0
    before_training: bool = True


@dataclass
class RunConfig:
    results_dir: str = "results"
    sweep: Optional[str] = None
    """Derived: the launch date-time when not set."""
    name: Optional[str] = None
    """Derived: <trainer>-<model>-<hardware>[-<extra overrides>]."""
    dir: Optional[str] = None
    """Derived: results_dir/sweep/name. Set it to resume a specific run folder."""
    resume: bool = True
    """Continue from the latest checkpoint in the run folder."""


@dataclass
class DebugConfig:
    crash_after_step: Optional[int] = None
    """Test hook: exit with code 3 right after this step's checkpoint (a simulated crash)."""


@dataclass
class Config:
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    launcher: Launcher = Launcher.auto
    """auto: SLURM when sbatch is on PATH, else local."""
    dry_run: bool = False
    """Print what would be submitted (or run) for every run; submit nothing."""
    site: Optional[str] = None
    """Site file with per-cluster SLURM settings (default: $FINELLAMA_SITE)."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


# ---------------------------------------------------------------- derived values


def world_size(hardware: HardwareConfig) -> int:
    return max(1, hardware.gpus_per_node) if hardware.device == Device.cuda else 1


def sequences_per_step(trainer: TrainerConfig) -> int:
    return trainer.prompts_per_step * trainer.num_generations


def derive_grad_accum(trainer: TrainerConfig, hardware: HardwareConfig) -> int:
    per_update = sequences_per_step(trainer)
    if trainer.algo == Algo.ppo:
        per_update //= max(1, trainer.ppo.num_mini_batches)
    return max(1, per_update // (trainer.micro_batch * world_size(hardware)))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120]


def default_run_name(cfg: Config, extra: List[str] = ()) -> str:
    parts = [cfg.trainer.algo.value, cfg.model.name, cfg.hardware.name, *extra]
    return slug("-".join(parts))


def resolve(cfg: Config, extra_name_parts: List[str] = (), now: Optional[_dt.datetime] = None) -> Config:
    """Fill the derived fields (grad_accum, run name/sweep/dir). Pure: returns a copy."""
    # A user-typed grad_accum is kept so validate() can reject it when it disagrees.
    grad_accum = cfg.trainer.grad_accum or derive_grad_accum(cfg.trainer, cfg.hardware)
    trainer = replace(cfg.trainer, grad_accum=grad_accum)
    sweep = cfg.run.sweep or (now or _dt.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    name = cfg.run.name or default_run_name(cfg, list(extra_name_parts))
    run_dir = os.path.abspath(cfg.run.dir or f"{cfg.run.results_dir}/{sweep}/{name}")
    return replace(cfg, trainer=trainer, run=replace(cfg.run, sweep=sweep, name=name, dir=run_dir))


def eval_num_examples(value: str) -> Optional[int]:
    """`all` -> None (whole split); otherwise a positive integer."""
    if str(value).strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError("eval.num_examples", f"expected a positive integer or `all`, got {value!r}") from None
    if n <= 0:
        raise ConfigError("eval.num_examples", f"must be > 0 or `all`, got {n}")
    return n


# -------------------------------------------------------------------- validation


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
    from finellama_rl.rewards import REWARD_FUNCS

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
    if cfg.data.source == DataSource.arithmetic:
        _positive("data.num_train", cfg.data.num_train)
        _positive("data.num_test", cfg.data.num_test)
    if cfg.debug.crash_after_step is not None and cfg.debug.crash_after_step % cfg.trainer.save_every:
        raise ConfigError("debug.crash_after_step", f"must be a multiple of trainer.save_every={cfg.trainer.save_every}")
