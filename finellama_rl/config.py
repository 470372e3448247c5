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
    samples: int = 1
    """Samples per problem for pass@k (1 = greedy only); k > 1 adds sampled pass@1..k."""
    sample_temperature: float = 0.7
    """Sampling temperature for the pass@k samples (greedy accuracy is always reported too)."""


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
class LadderConfig:
    enabled: bool = True
    """On out-of-memory, step down and continue from the latest checkpoint."""
    start_rung: int = 0
    """Rung to start at; launch sets it from the planner or the fit memory."""
    min_completion_tokens: int = 128
    """Floor for cutting trainer.max_completion_tokens (cuts change the experiment)."""
    min_prompt_tokens: int = 128
    length_step: float = 0.75
    """Each length rung keeps this fraction of the previous length."""
    use_planner: bool = True
    """launch starts GPU jobs at the largest rung the memory planner predicts to fit."""
    planner_margin: float = 0.10
    remember_fit: bool = True
    """Remember the rung that worked per model/trainer/hardware/lengths; start there next time."""
    max_resubmits: int = 3
    """Resubmissions after the scheduler killed a job for memory."""


@dataclass
class DebugConfig:
    crash_after_step: Optional[int] = None
    """Test hook: exit with code 3 right after this step's checkpoint (a simulated crash)."""
    oom_above_tokens: Optional[int] = None
    """Fault injection: any forward over more than this many tokens (batch x length)
    raises a real torch.OutOfMemoryError, a simulated memory budget for CPU tests."""
    host_mem_mb_per_sequence: int = 0
    """Fault injection: hold this much host RAM per micro-batch sequence during each
    step, so a job exceeds SLURM's --mem at large micro batches."""


@dataclass
class Config:
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
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
