"""The whole run schema: typed dataclasses (every field documented under it), the
closed choices as `str` Enums, their Hydra registration, and small pure queries on the
schema (`world_size`, `sequences_per_step`, `derive_grad_accum`, `sft_max_steps`, ...).

Hydra composes `conf/` on top of the `schema` node registered here, so a misspelled
key or a wrong type fails at composition. The result becomes a `Config` dataclass
exactly once, in `compose.load_config()`; below that no code sees a DictConfig.
Composition (compose.py) fills the derived fields and names the run; cross-field rules
live in validation.py (not `__post_init__`, which OmegaConf runs on the schema's `???`
defaults), and every failure is a `ConfigError` (errors.py) naming the key and the fix,
which the entry points turn into a short message and exit code 2.

Used by every entry point, e.g. `python -m finellama_rl.launch experiment=smoke`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from omegaconf import MISSING

from finellama_rl.errors import ConfigError


class Algo(str, Enum):
    # Member names equal their values: OmegaConf matches enum overrides by name.
    grpo = "grpo"
    ppo = "ppo"
    sft = "sft"  # supervised fine-tuning on reference solutions (TRL's SFTTrainer)
    rm = "rm"  # train an outcome reward model (trainers/rm.py) for reward_model.path


class BestMetric(str, Enum):
    """What makes an SFT checkpoint the best one (trainer.sft.best_metric)."""

    accuracy = "accuracy"  # greedy accuracy by generation at each evaluation (higher is better)
    loss = "loss"  # teacher-forced loss on the validation problems' reference solutions (lower is better)


class PairOrder(str, Enum):
    """Whether a + b and b + a are one operand pair of the synthetic task (data.heldout_pairs)."""

    unordered = "unordered"  # one pair: no held-out sum or product is trained in either order
    ordered = "ordered"  # two pairs: a held-out 3 + 5 may have 5 + 3 in training (commutativity is what can generalise)


class Tracking(str, Enum):
    """Where metrics go besides metrics.jsonl (the top-level `tracking` setting)."""

    none = "none"
    tensorboard = "tensorboard"  # event files in <run>/tensorboard/
    wandb = "wandb"  # Weights & Biases (offline unless WANDB_MODE says otherwise)
    all = "all"  # both


class LossType(str, Enum):
    """GRPO's loss normalisation (trainer.loss_type), always over the whole step."""

    grpo = "grpo"  # each completion's token mean, averaged over the step's completions
    dapo = "dapo"  # the step's summed token losses over its completion tokens (TRL's default)
    dr_grpo = "dr_grpo"  # the step's summed token losses over completions x max_completion_tokens
    bnpo = "bnpo"  # TRL: per micro batch's tokens; refused (validation.py): invariant, it is dapo


class AdvantageScaling(str, Enum):
    """What advantages are divided by (trainer.advantage_scaling)."""

    group = "group"  # GRPO: the group's reward std (TRL's scale_rewards=group); PPO refuses it
    batch = "batch"  # GRPO: the std of all the step's rewards; PPO: GAE whitened over the step's tokens
    none = "none"  # no division (GRPO: reward minus group mean, Dr. GRPO; PPO: raw GAE)


class Truncation(str, Enum):
    """A completion that reaches max_completion_tokens without EOS (trainer.truncation)."""

    none = "none"  # scored and trained on like any other
    mask = "mask"  # keeps its reward (baselines, statistics) but none of its tokens carries a loss
    penalty = "penalty"  # its reward is lowered by trainer.truncation_penalty


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


class EvalProtocol(str, Enum):
    """How prompts are written and answers scored (eval.protocol); README "Evaluation protocols"."""

    qwen_boxed = "qwen_boxed"  # Qwen2.5's GSM8K recipe: chat template, "... within \boxed{}", 0-shot, math-verify
    qwen25_math_cot = "qwen25_math_cot"  # Qwen2.5-Math's default: the instruction as the system message, 2048 tokens
    lm_eval_gsm8k = "lm_eval_gsm8k"  # lm-evaluation-harness 0.4 gsm8k: 5-shot "Question: ...\nAnswer:", strict-match
    finellama = "finellama"  # data.system_prompt, "#### <number>", strict (the protocol of schema-1 runs)


class OomPhase(str, Enum):
    """Phases debug.oom_at_step can strike (attempts.jsonl records the phase of every OOM)."""

    generation = "generation"
    training = "training"
    optimizer = "optimizer"
    eval = "eval"


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
    tiny_final_norm: float = 1.0
    """Tiny only: initial weight of the final RMSNorm. With frozen random tied embeddings
    (std 0.02) the logits of a random base stay within about +-0.02*hidden_size*this, so at
    1.0 LoRA training can never make a confident prediction; the demo presets use 10."""
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
    adapter: Optional[str] = None
    """A trained LoRA adapter to start from: a run folder (its final adapter: the best
    checkpoint when the run restored one, else the latest) or a checkpoint folder. It
    stays frozen under a new trainable adapter; the KL reference is this adapter's policy."""


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    """LoRA dropout. GRPO and PPO: must be 0 (the update's log-probs must equal the
    sampler's, so the first ratio is 1); SFT may use it."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class QuantizationConfig:
    enabled: bool = True
    """4-bit base through bitsandbytes; false trains the full-precision model."""
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True
    bits: int = 4
    """4: NF4/FP4 (quant_type, double_quant); 8: LLM.int8 (bitsandbytes), e.g. the *full*
    preset's 14B generator."""


@dataclass
class PPOConfig:
    """PPO only (trainer=ppo); GRPO ignores this block."""

    epochs: int = 2
    """PPO epochs over each rollout batch (GRPO's counterpart is trainer.num_iterations)."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch; each accumulates micro batches of the rollout."""
    kl_coef: float = 0.05
    """KL penalty as per-token reward shaping (RLHF style): r_t -= kl_coef x (log pi -
    log pi_ref), the k1 estimator, against the base with the adapter disabled. PPO's only
    KL knob (trainer.beta is GRPO's KL-in-loss coefficient and must stay 0 for PPO).
    0 = no reference forward pass at all, and no train/kl* metrics."""
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    clip_range_value: float = 0.2
    value_head: ValueHead = ValueHead.shared


@dataclass
class SFTConfig:
    """Supervised fine-tuning only (trainer=sft)."""

    epochs: Optional[float] = None
    """Passes over the training set; sets trainer.max_steps to ceil(epochs x examples /
    prompts_per_step). None: train trainer.max_steps steps."""
    warmup_ratio: float = 0.0
    """Linear warmup over this fraction of the steps (used when trainer.warmup_steps is 0)."""
    keep_best: bool = False
    """Keep the best checkpoint by best_metric (never pruned) and restore it at the end."""
    best_metric: BestMetric = BestMetric.accuracy
    """accuracy: greedy accuracy by generation at each eval; loss: teacher-forced eval loss."""
    dataloader_workers: int = 0
    """Worker processes that collate training batches."""


class ScoringPrecision(str, Enum):
    """How a frozen scoring model (reward_model, judge) is loaded."""

    nf4 = "nf4"  # 4-bit NF4 (bitsandbytes), compute in the hardware's dtype
    int8 = "int8"  # 8-bit LLM.int8 (bitsandbytes)
    bf16 = "bf16"  # unquantized bfloat16 weights
    fp32 = "fp32"  # unquantized float32 weights (CPU)


class RewardModelKind(str, Enum):
    orm = "orm"  # outcome reward model: one score per (question, completion), sequence classification
    prm = "prm"  # process reward model, Qwen2.5-Math-PRM format: a score per step at step separators


class StepAggregation(str, Enum):
    """How a process reward model's per-step scores become one reward (reward_model.aggregation)."""

    min = "min"  # the weakest step (a solution is as good as its worst step)
    last = "last"  # the final step's score
    mean = "mean"


@dataclass
class RewardModelConfig:
    """The frozen reward model behind the `reward_model` reward source (rewards/reward_model.py),
    and the base that trainer=rm trains. Unused unless trainer.rewards names reward_model or
    trainer=rm."""

    model: Optional[ModelConfig] = None
    """Architecture and shape (planning; trainer=rm's base, which defaults to `model`): a
    conf/model option chosen with `model@reward_model.model=qwen2.5-1.5b`."""
    path: Optional[str] = None
    """What scores: a trainer=rm run folder, or a folder/hub id of a sequence-classification
    (orm) or Qwen2.5-Math-PRM-format (prm) model."""
    kind: RewardModelKind = RewardModelKind.orm
    aggregation: StepAggregation = StepAggregation.min
    """prm only: min | last | mean of the per-step scores."""
    quantization: ScoringPrecision = ScoringPrecision.nf4
    gpu: Optional[int] = None
    """GPU index on the node; None: the policy's own GPU (each training process holds a copy).
    A GPU that no training process uses makes the run train on the others (resolve())."""
    batch_size: int = 16
    """Sequences per scoring forward."""
    max_tokens: int = 1024
    """Inputs longer than this are cut from the left of the completion's text (kept: its end)."""
    step_separator: str = "\n\n"
    """prm only: how a completion is split into steps (blank lines by default)."""
    trust_remote_code: bool = False
    """prm only: load a checkpoint that ships its own modeling code (Qwen2.5-Math-PRM does)."""


@dataclass
class JudgeConfig:
    """The frozen instruction model behind the `judge` reward source (rewards/judge.py): it reads
    the question, the completion and (optionally) the reference through a fixed prompt and answers
    CORRECT or INCORRECT; malformed verdicts score 0 and are counted."""

    model: Optional[ModelConfig] = None
    """The judge's model: a conf/model option chosen with `model@judge.model=qwen2.5-14b`
    (its path or hub_id is loaded)."""
    quantization: ScoringPrecision = ScoringPrecision.bf16
    """bf16, or int8 to halve its memory (the seed's 14B judge: about 28 -> 14 GB)."""
    gpu: Optional[int] = None
    """GPU index on the node; None: the policy's own GPU."""
    batch_size: int = 8
    """Completions judged per generate call."""
    max_new_tokens: int = 8
    """Verdict budget (greedy); the verdict is one word."""
    max_input_tokens: int = 1536
    """Longer judge prompts keep the completion's end (the final answer) and drop its start."""
    use_reference: bool = True
    """Show the judge the reference solution."""


@dataclass
class RMTrainConfig:
    """trainer=rm only: how the labelled data is made (trainers/rm.py)."""

    num_problems: Optional[int] = None
    """Training-split problems used (None: all); a held-out share of them is the test set."""
    heldout_fraction: float = 0.2
    """Share of the problems (not of the completions) held out for accuracy/precision/recall/AUROC."""
    samples_per_problem: int = 4
    """Completions sampled from the policy (`model`, with model.adapter) per problem."""
    sample_temperature: float = 1.0
    corrupted_per_problem: int = 1
    """Copies of a sampled completion whose final answer is changed to a wrong number
    everywhere it appears (labelled by the scorer like every other example)."""
    include_reference: bool = True
    """Add the problem's reference solution, written in the protocol's answer form."""
    balance: bool = False
    """Drop surplus examples of the larger class in the training part (not the held-out part).
    Off by default: on the tiny task it skewed the classifier's prior (docs/LOG.md)."""


@dataclass
class TrainerConfig:
    """One global step (the unit of max_steps, save_every, eval_every, log_every,
    warmup_steps and metrics.jsonl) = prompts_per_step prompts sampled and trained on:
    GRPO one optimizer step (times num_iterations), PPO one rollout plus
    ppo.epochs x ppo.num_mini_batches optimizer steps."""

    algo: Algo = MISSING
    """grpo (TRL's GRPOTrainer), ppo (ours), sft; selects conf/trainer/<algo>.yaml."""
    learning_rate: float = 1e-5
    """AdamW learning rate of the trainable (fp32) weights: LoRA, and PPO's value head."""
    lr_schedule: LRSchedule = LRSchedule.constant
    """LR schedule after warmup, both trainers (PPO over optimizer steps, GRPO over global steps)."""
    warmup_steps: int = 0
    """Linear warmup length in global steps, both trainers (PPO converts it to optimizer
    steps internally: x ppo.epochs x ppo.num_mini_batches)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the trainable weights, both trainers."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm per optimizer step (0 = no clipping), both trainers."""
    prompts_per_step: int = 8
    """Prompts consumed per global step, over all devices (each sampled num_generations times)."""
    num_generations: int = 4
    """Completions per prompt: GRPO's group size (>= 2); PPO: must be 1."""
    micro_batch: int = 8
    """Sequences per device per forward/backward, both trainers (the OOM ladder halves it;
    the gradient does not change: PPO and GRPO normalise over the whole batch)."""
    grad_accum: Optional[int] = None
    """Derived: prompts_per_step * num_generations / (micro_batch * devices), per PPO
    mini-batch. Do not set."""
    generation_batch: int = 0
    """Sequences per device per generate call, both trainers (0 = the whole step in one
    call). It changes neither what is sampled (keyed sampling: job/sampling.py) nor the
    gradient (GRPO scores the whole step at once). The OOM ladder lowers it first when
    generation runs out of memory."""
    max_prompt_tokens: int = 256
    """Longer training prompts are dropped (not truncated), both trainers."""
    max_completion_tokens: int = 256
    """Sampling budget per completion, both trainers."""
    temperature: float = 1.0
    """Sampling temperature, both trainers; log-probs use logits / temperature."""
    top_p: float = 1.0
    """GRPO: nucleus sampling. PPO: must be 1 (its log-probs do not model the truncation)."""
    beta: float = 0.0
    """GRPO only: coefficient of the k3 KL estimator added to the loss (TRL's beta), against
    the base with the adapter disabled. PPO: must be 0; use trainer.ppo.kl_coef."""
    num_iterations: int = 1
    """GRPO only: optimisation passes over each generation batch (TRL's num_iterations, mu).
    PPO: must be 1 (use trainer.ppo.epochs)."""
    clip_epsilon: float = 0.2
    """Clip range of the probability ratio. GRPO: acts only when num_iterations > 1 (with
    one pass the ratio is exactly 1, and train/clip_frac reads 0). PPO: the policy clip."""
    loss_type: LossType = LossType.dapo
    """GRPO only: what the step's summed token losses are divided by, always over the whole
    step (every micro batch, generate call and device): dapo (TRL's default) the step's
    completion tokens; grpo each completion's own token count, then the number of
    completions; dr_grpo completions x max_completion_tokens (a constant). bnpo (TRL: each
    micro batch's tokens, so the gradient would follow micro_batch) is refused: use dapo.
    PPO always divides by all completion tokens of its mini-batch (over all devices) and
    refuses any other value than dapo."""
    advantage_scaling: AdvantageScaling = AdvantageScaling.group
    """What advantages are divided by, both trainers. GRPO (advantage = reward - group
    mean): group (the group's reward std, TRL's default), batch (the std of every reward of
    the step), none (nothing: reward minus group mean, Dr. GRPO). PPO: batch (GAE advantages
    minus their mean, over their std, over every completion token of the step on all
    devices; conf/trainer/ppo.yaml's default, was ppo.whiten_advantages=true) or none (raw
    GAE); group is refused (one completion per prompt)."""
    truncation: Truncation = Truncation.none
    """A completion that reaches max_completion_tokens without EOS, both trainers: none
    (trained on like any other; PPO ends its episode there), mask (its reward still counts
    in group baselines and statistics, but none of its tokens carries a loss or counts in
    the token normalisers: TRL's mask_truncated_completions), penalty (truncation_penalty is
    subtracted from its reward, logged as train/reward/truncation). Logged per step:
    train/frac_truncated."""
    truncation_penalty: float = 1.0
    """Subtracted from a truncated completion's reward when truncation=penalty, both
    trainers (>= 0)."""
    max_steps: int = 100
    """Global steps to train, both trainers."""
    save_every: int = 50
    """Checkpoint every N global steps, both trainers."""
    keep_last: int = 2
    """Committed checkpoints kept (older ones are pruned after a new one is durable); 0 = all
    (never prune: seed_ppo_3b keeps its 25, the seed's SFT recipes keep every one)."""
    eval_every: int = 0
    """Evaluate on the validation split every N steps during training (evals/step_N.json;
    what SFT keep-best and any choice of checkpoint or recipe read); 0 = none. The
    baseline before and the final evaluation after training are on the test split."""
    log_every: int = 1
    """Write metrics.jsonl every N global steps (averaged since the last line), both trainers."""
    seed: int = 0
    """Seeds model init, sampling and data order, both trainers."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (the OOM ladder turns it on), both trainers."""
    rewards: List[str] = field(default_factory=lambda: ["correctness", "format"])
    """Reward sources, summed with reward_weights and logged each as train/reward/<name>: rule
    rewards (correctness, format, digits) and frozen models (reward_model, judge: their own
    top-level sections). README "Reward sources"."""
    reward_weights: Optional[List[float]] = None
    """One weight per reward (None: all 1), both trainers (GRPO: TRL's reward_weights)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMTrainConfig = field(default_factory=RMTrainConfig)


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    """sbatch --partition (checked against sinfo before anything is submitted)."""
    account: Optional[str] = None
    """sbatch --account; set it once for every profile in your site file."""
    qos: Optional[str] = None
    """sbatch --qos."""
    constraint: Optional[str] = None
    """sbatch --constraint (node features, e.g. a100_80g)."""
    cpus_per_task: int = 8
    """sbatch --cpus-per-task."""
    mem_gb: int = 64
    """Host memory of the job (sbatch --mem, GB)."""
    timeout_min: int = 1440
    """Time limit of one job in minutes (sbatch --time); a run that needs longer requeues itself."""
    signal_delay_s: int = 120
    """SLURM sends USR2 this long before the time limit: save and requeue."""
    max_requeues: int = 3
    additional: Dict[str, str] = field(default_factory=dict)
    """Extra sbatch options, e.g. {mail-type: END}."""
    arrays: bool = True
    """Submit the runs of a sweep that ask for the same resources as one job array (one
    sbatch call, `--array=0-N%P`; runs with other requests form arrays of their own);
    false: one job per run."""
    array_parallelism: Optional[int] = None
    """At most this many tasks of one array run at once (the `%P` of `--array`); None: as
    many as the cluster starts. Each array has its own cap (SLURM has none across arrays)."""


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.cpu
    gpu_mem_gb: float = 0.0
    gpus_per_node: int = 0
    processes: Optional[int] = None
    """Data-parallel training processes on the node (torchrun, one per device); None: one
    per GPU on cuda, 1 on cpu. On cpu, > 1 runs the same data-parallel path over gloo."""
    bf16: bool = False
    nodes: int = 1
    """Nodes of one run (SLURM): one job on N nodes, one torchrun per node (static rendezvous
    on the first node's address from SLURM), data parallel over nodes x processes ranks."""
    runs_per_gpu: str = "1"
    """Runs packed into one job that share its GPU, CPUs and memory, each an srun step with
    its own run folder and an equal share (CUDA: torch's per-process memory fraction): an
    integer, or `auto` (as many as fit in 90% of gpu_mem_gb by the planner's predicted
    peaks; 1 on cpu). On cpu an integer packs that many runs per job."""
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
    validation_size: int = 500
    """Problems of the validation split, held out of training: every selection reads it
    (evaluations during training at trainer.eval_every, SFT keep-best, recipe choices),
    training never sees it, and the test split is only reported (baseline and final
    evaluations). GSM8K: drawn from the training split (data.path or data.train_split)
    by random.Random(data.split_seed), the rest stays the training split; the synthetic
    task: generated from its own operand pairs (data.heldout_pair_fraction)."""
    split_seed: int = 2026
    """Seed of the validation draw (GSM8K) and of the synthetic task's operand-pair
    partition into train / validation / test."""
    num_train: int = 2000
    """Synthetic task only: training problems."""
    num_test: int = 200
    heldout_pair_fraction: float = 0.2
    """Synthetic task only: the share of operand pairs reserved for the test split, and
    the same share for validation; training problems use the rest. No step of a test or
    validation solution ("a + b = c", with a + b and b + a the same pair) occurs in any
    training solution, so held-out accuracy measures arithmetic on unseen pairs."""
    heldout_pairs: PairOrder = PairOrder.unordered
    """Synthetic task only: unordered (a + b and b + a are one pair, held out together: a
    held-out sum was never trained in either order) or ordered (3 + 5 and 5 + 3 are two
    pairs, each drawn apart: a held-out problem may be the reverse of a trained one; what
    `make run` uses, README "make run"). With ordered, no held-out solution step occurs
    verbatim in training either, but the fact it states may, in the other order."""
    synthetic_seed: int = 1234
    max_operand: int = 20
    """Synthetic task only: operands are drawn from 1..max_operand (more digits: harder)."""
    ops: List[str] = field(default_factory=lambda: ["add", "sub", "mul", "add_sub"])
    """Synthetic task only: problem kinds, some of add|sub|mul|add_sub (add_sub has two steps)."""
    system_prompt: str = (
        "Solve the math problem step by step. End with a line '#### <number>' giving the final answer."
    )


@dataclass
class EvalConfig:
    protocol: EvalProtocol = EvalProtocol.qwen_boxed
    """Prompt template, shots, stop strings and scorer of every evaluation, and also of
    the training prompt and the correctness/format rewards (what training rewards is what
    evaluation credits): qwen_boxed (Qwen2.5's published GSM8K recipe, scored by
    math-verify), qwen25_math_cot (Qwen2.5-Math's evaluation default: the boxed
    instruction as the system message, the bare question as the user turn), lm_eval_gsm8k (lm-evaluation-harness's gsm8k task, strict-match and
    flexible-extract), finellama (data.system_prompt and `#### n`, strict)."""
    num_examples: str = "all"
    """How many problems of the evaluated split (the first N; test for the baseline and
    final evaluations, validation during training): a positive integer or `all`."""
    max_new_tokens: Optional[int] = None
    """Generation budget per completion; None: the protocol's (qwen_boxed 1024, qwen25_math_cot
    2048, lm_eval_gsm8k 256 like the harness, finellama 256). launch warns when it differs
    from trainer.max_completion_tokens (README "Budgets")."""
    batch_size: int = 64
    """Sequences per generate call (greedy: prompts; pass@k: prompts x samples), halved on
    out-of-memory down to 1. 0 (schema of older runs) means 64."""
    shots: Optional[int] = None
    """Worked examples in the eval prompt; None: the protocol's (lm_eval_gsm8k 5, else 0).
    Training prompts never carry shots."""
    before_training: bool = True
    samples: int = 1
    """Samples per problem for pass@k (1 = greedy only); k > 1 adds sampled pass@1..k."""
    sample_temperature: float = 0.7
    """Sampling temperature for the pass@k samples (greedy accuracy is always reported too)."""


@dataclass
class RunConfig:
    results_dir: str = "results"
    """Folder of every sweep (<results_dir>/<sweep>/<run>) and of the results index."""
    sweep: Optional[str] = None
    """Derived: the launch date-time when not set."""
    name: Optional[str] = None
    """Derived: <trainer>-<model>-<hardware>[-<extra overrides>]."""
    dir: Optional[str] = None
    """Derived: results_dir/sweep/name. Set it to resume a specific run folder."""
    resume: bool = True
    """Continue from the latest checkpoint in the run folder."""
    allow_outside_results_dir: bool = False
    """Allow a run.dir outside run.results_dir (by default refused: a typo such as
    run.dir=. would otherwise make the current folder a run folder)."""


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
    """Restarts, at the next rung in the same job, of a run whose training step the
    scheduler killed for memory (login/resubmit.py)."""


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
    oom_generation_above_sequences: Optional[int] = None
    """Fault injection: a generation forward of more than this many sequences raises
    torch.OutOfMemoryError (a simulated budget for the generation phase)."""
    oom_at_step: Optional[int] = None
    """Fault injection: one torch.OutOfMemoryError when phase debug.oom_phase starts at
    this global step (once per run folder), to test the ladder mid-run."""
    oom_phase: OomPhase = OomPhase.training
    """generation | training | optimizer | eval: where debug.oom_at_step strikes."""
    oom_rank: Optional[int] = None
    """Data parallel: only this rank injects debug.oom_at_step (None: every rank)."""
    eos_logit_bias: float = 0.0
    """Tests only: added to the EOS logit before sampling in both trainers, so that a tiny
    random model stops at varied lengths instead of always at the cap (split-invariance
    and truncation tests). Sampling then no longer matches the policy's log-probs."""
    step_sleep_s: float = 0.0
    """Test hook: sleep this long after every optimizer step, so a run lasts a known wall
    time whatever the machine's load, without using the CPUs (the SLURM time-limit tests)."""


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
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """The `reward_model` reward source (and trainer=rm's base)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The `judge` reward source."""
    launcher: Launcher = Launcher.auto
    """auto: SLURM when sbatch is on PATH, else local."""
    dry_run: bool = False
    """Print what would be submitted (or run) for every run; submit nothing."""
    site: Optional[str] = None
    """Site file with per-cluster SLURM settings (default: $FINELLAMA_SITE)."""
    tracking: Tracking = Tracking.none
    """Also send metrics to TensorBoard event files (<run>/tensorboard/), Weights & Biases
    (needs `pip install wandb`; offline unless WANDB_MODE is set), or all; none costs nothing."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


# ---------------------------------------------------------------- queries on the schema (pure)


def processes_per_node(hardware: HardwareConfig) -> int:
    """Data-parallel processes of a run on each node (torchrun's nproc_per_node)."""
    if hardware.processes is not None:
        return max(1, hardware.processes)
    return max(1, hardware.gpus_per_node) if hardware.device == Device.cuda else 1


def world_size(hardware: HardwareConfig) -> int:
    """Data-parallel processes of a run (torchrun ranks) over all its nodes."""
    return max(1, hardware.nodes) * processes_per_node(hardware)


RULE_REWARDS = ("correctness", "format", "digits")  # rule reward functions of the evaluation protocol (rewards/rules.py)
SCORING_SOURCES = ("reward_model", "judge")  # reward sources backed by a frozen model (rewards/sources.py)
SOURCE_NAMES = (*RULE_REWARDS, *SCORING_SOURCES)  # every name trainer.rewards accepts


def scoring_sources(trainer: TrainerConfig) -> List[str]:
    """The model-backed reward sources an RL run loads (none for sft and rm)."""
    if trainer.algo not in (Algo.grpo, Algo.ppo):
        return []
    return [name for name in SCORING_SOURCES if name in trainer.rewards]


def scoring_gpus(cfg: "Config") -> Dict[str, int]:
    """{source: GPU index} of the scoring models this run loads that name a GPU of their own."""
    named = {name: getattr(cfg, name).gpu for name in scoring_sources(cfg.trainer)}
    return {name: gpu for name, gpu in named.items() if gpu is not None}




def sequences_per_step(trainer: TrainerConfig) -> int:
    return trainer.prompts_per_step * trainer.num_generations


def derive_grad_accum(trainer: TrainerConfig, hardware: HardwareConfig) -> int:
    per_update = sequences_per_step(trainer)
    if trainer.algo == Algo.ppo:
        per_update //= max(1, trainer.ppo.num_mini_batches)
    return max(1, per_update // (trainer.micro_batch * world_size(hardware)))


def sft_max_steps(trainer: TrainerConfig, num_examples: int) -> int:
    """Optimizer steps of trainer.sft.epochs passes over num_examples (SFT); else max_steps.
    Equals the HF Trainer's count whenever micro_batch divides prompts_per_step."""
    if trainer.algo != Algo.sft or trainer.sft.epochs is None:
        return trainer.max_steps
    return max(1, math.ceil(trainer.sft.epochs * num_examples / trainer.prompts_per_step))








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
