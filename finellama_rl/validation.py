"""Cross-field validation of a resolved Config: every failure is a ConfigError
naming the key and what to set instead (exit code 2 at the entry points)."""
from __future__ import annotations

import re
from pathlib import Path

from finellama_rl.validation_scoring import validate_scoring
from finellama_rl.config import SOURCE_NAMES, AdvantageScaling, Algo, Config, DataSource, Device, HardwareConfig, LadderConfig, LossType, RunConfig, SlurmConfig, TrainerConfig, derive_grad_accum, eval_num_examples, processes_per_node, sequences_per_step, world_size
from finellama_rl.errors import ConfigError


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


def _validate_generation_batch(t: TrainerConfig, hardware: HardwareConfig) -> None:
    """Any generation batch chunks the step's generate calls (both trainers: the step is
    scored as a whole, and keyed sampling does not depend on the chunks); GRPO devices
    hold whole groups."""
    _non_negative("trainer.generation_batch", t.generation_batch)
    if t.algo != Algo.grpo:
        return
    devices = world_size(hardware)
    per_device = sequences_per_step(t) // devices
    if per_device % t.num_generations:
        raise ConfigError("trainer.num_generations", f"each of the {devices} devices must hold whole groups: "
                          f"{per_device} sequences per device are not divisible by num_generations={t.num_generations}; "
                          "raise trainer.prompts_per_step")


def _validate_rl_knobs(t: TrainerConfig) -> None:
    """One meaning per knob: PPO and GRPO reject the settings that would mean something else."""
    _positive("trainer.num_iterations", t.num_iterations)
    if t.algo not in (Algo.grpo, Algo.ppo):
        return
    if t.lora.enabled and t.lora.dropout > 0:
        raise ConfigError("trainer.lora.dropout", f"must be 0 for {t.algo.value} (got {t.lora.dropout}): with dropout the "
                          "update's log-probs differ from the sampler's; set trainer.lora.dropout=0")
    if t.algo == Algo.ppo:
        if t.beta:
            raise ConfigError("trainer.beta", f"is GRPO's KL-in-loss coefficient; PPO's KL penalty is "
                              f"trainer.ppo.kl_coef (set trainer.beta=0 trainer.ppo.kl_coef={t.beta:g})")
        if t.top_p < 1:
            raise ConfigError("trainer.top_p", f"must be 1 for PPO (got {t.top_p}): its log-probs do not model "
                              "nucleus truncation, so the ratios would be biased")
        if t.num_iterations != 1:
            raise ConfigError("trainer.num_iterations", f"is GRPO's; PPO passes over a rollout trainer.ppo.epochs times "
                              f"(set trainer.num_iterations=1 trainer.ppo.epochs={t.num_iterations})")
        _non_negative("trainer.ppo.kl_coef", t.ppo.kl_coef)
        if t.loss_type != LossType.dapo:
            raise ConfigError("trainer.loss_type", f"is GRPO's ({t.loss_type.value}); PPO always divides by its mini-batch's "
                              "completion tokens over all devices (dapo's normalisation): leave trainer.loss_type=dapo")
        if t.advantage_scaling == AdvantageScaling.group:
            raise ConfigError("trainer.advantage_scaling", "group divides by a group's reward std, and PPO samples one "
                              "completion per prompt: use batch (GAE whitened over the step's tokens) or none (raw GAE)")
    if t.algo == Algo.grpo and t.loss_type == LossType.bnpo:
        raise ConfigError("trainer.loss_type", "bnpo divides by each micro batch's completion tokens (TRL), so the "
                          "gradient would change with trainer.micro_batch, the OOM ladder and the number of devices; "
                          "use dapo, the same normalisation over the whole step")
    _non_negative("trainer.truncation_penalty", t.truncation_penalty)


def _validate_trainer(t: TrainerConfig, hardware: HardwareConfig) -> None:
    _positive("trainer.learning_rate", t.learning_rate, "e.g. trainer.learning_rate=1e-5")
    _validate_batch(t, hardware)
    _validate_generation_batch(t, hardware)
    _validate_rl_knobs(t)
    for key in ("max_prompt_tokens", "max_completion_tokens", "max_steps", "save_every", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    for key in ("keep_last", "warmup_steps", "eval_every", "beta", "weight_decay", "max_grad_norm"):
        _non_negative(f"trainer.{key}", getattr(t, key))
    if t.warmup_steps >= t.max_steps and t.warmup_steps:
        raise ConfigError("trainer.warmup_steps", f"must be < trainer.max_steps={t.max_steps}")
    _positive("trainer.temperature", t.temperature)
    if not 0 < t.top_p <= 1:
        raise ConfigError("trainer.top_p", f"must be in (0, 1], got {t.top_p}")
    if not 0 < t.clip_epsilon < 1:
        raise ConfigError("trainer.clip_epsilon", f"must be in (0, 1), got {t.clip_epsilon}")
    if not t.rewards:
        raise ConfigError("trainer.rewards", f"needs at least one of {'|'.join(SOURCE_NAMES)}")
    for name in t.rewards:
        if name not in SOURCE_NAMES:
            raise ConfigError("trainer.rewards", f"unknown reward {name!r}: expected one of {'|'.join(SOURCE_NAMES)}")
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
    if h.slurm.array_parallelism is not None:
        _positive("hardware.slurm.array_parallelism", h.slurm.array_parallelism, "or null for no cap")
    _validate_scale_out(h)


RUNS_PER_GPU = re.compile(r"auto|[1-9][0-9]*")


def _validate_scale_out(h: HardwareConfig) -> None:
    """hardware.nodes and hardware.runs_per_gpu: one run on several nodes, or several runs on one GPU."""
    _positive("hardware.nodes", h.nodes, "the nodes of one run, e.g. hardware.nodes=2")
    if not RUNS_PER_GPU.fullmatch(str(h.runs_per_gpu)):
        raise ConfigError("hardware.runs_per_gpu", f"expected a positive integer or auto, got {h.runs_per_gpu!r}")
    if str(h.runs_per_gpu) != "1":
        if h.nodes > 1:
            raise ConfigError("hardware.runs_per_gpu", f"packs runs on one GPU; a run on hardware.nodes={h.nodes} "
                              "nodes cannot share: set hardware.runs_per_gpu=1 or hardware.nodes=1")
        if processes_per_node(h) > 1:
            raise ConfigError("hardware.runs_per_gpu", f"packs one-process runs; this run trains with "
                              f"{processes_per_node(h)} processes: set hardware.processes=1 (and gpus_per_node=1) "
                              "or hardware.runs_per_gpu=1")


SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
SBATCH_OPTION = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
# sbatch options that launch sets itself, and the setting to use instead
RESERVED_SBATCH = {
    "partition": "hardware.slurm.partition", "account": "hardware.slurm.account", "qos": "hardware.slurm.qos",
    "constraint": "hardware.slurm.constraint", "cpus-per-task": "hardware.slurm.cpus_per_task",
    "mem": "hardware.slurm.mem_gb", "time": "hardware.slurm.timeout_min", "signal": "hardware.slurm.signal_delay_s",
    "gpus-per-node": "hardware.gpus_per_node", "job-name": "run.name", "requeue": "hardware.slurm.max_requeues",
    "no-requeue": "hardware.slurm.max_requeues=0",
}
FIXED_SBATCH = ("nodes", "ntasks-per-node", "output", "error", "open-mode", "array", "wrap", "test-only", "parsable")


def _no_control_chars(key: str, value) -> None:
    if value is not None and CONTROL_CHARS.search(str(value)):
        raise ConfigError(key, f"contains a control character (newline, tab, ...): {str(value)!r}; remove it")


SLURM_NAME_CHARS = {  # what SLURM itself accepts in these names (constraint: features with & | [ ] * : operators)
    "partition": re.compile(r"[A-Za-z0-9._,-]+"), "account": re.compile(r"[A-Za-z0-9._-]+"),
    "qos": re.compile(r"[A-Za-z0-9._-]+"), "constraint": re.compile(r"[A-Za-z0-9._,&|\[\]*:()-]+"),
}


def _validate_slurm_strings(s: SlurmConfig) -> None:
    """Every string that reaches the submission script: names in SLURM's own character
    sets, no control characters anywhere (a newline would become a new script line),
    `additional` keys shaped like sbatch long options."""
    for key, allowed in SLURM_NAME_CHARS.items():
        value = getattr(s, key)
        _no_control_chars(f"hardware.slurm.{key}", value)
        if value is not None and not allowed.fullmatch(str(value)):
            raise ConfigError(f"hardware.slurm.{key}", f"{value!r} has characters SLURM does not use in a {key} name")
    for key, value in s.additional.items():
        _no_control_chars("hardware.slurm.additional", key)
        if not SBATCH_OPTION.fullmatch(str(key)):
            raise ConfigError(f"hardware.slurm.additional.{key}", "is not an sbatch long option name "
                              "(lower-case letters, digits and single dashes, e.g. mail-type)")
        if key in RESERVED_SBATCH:
            raise ConfigError(f"hardware.slurm.additional.{key}", f"is set by launch; use {RESERVED_SBATCH[key]} instead")
        if key in FIXED_SBATCH:
            raise ConfigError(f"hardware.slurm.additional.{key}", "is set by launch and cannot be changed")
        _no_control_chars(f"hardware.slurm.additional.{key}", value)


def _safe_name(key: str, value) -> None:
    if value is None:
        return
    if not SAFE_NAME.fullmatch(value) or ".." in value or value.startswith("."):
        raise ConfigError(key, f"{value!r} is not a safe folder name: use letters, digits and . _ - "
                               "(no '/', no spaces, no '..', not starting with '.')")


def validate_run_paths(run: RunConfig, resuming: bool = False) -> None:
    """The run folder of a resolved config (launch and train; evaluate reads folders anywhere):
    safe names; run.results_dir, the run folder, its sweep folder (ledger.jsonl) and the
    index folder never `/`, a home, a system folder or the package (ownership.py); the run
    folder inside run.results_dir unless run.allow_outside_results_dir (or an existing run
    is resumed: it was checked when it was made), not inside another run's folder, not a
    folder of runs."""
    from finellama_rl.results import run_dir_problem

    _safe_name("run.name", run.name)
    _safe_name("run.sweep", run.sweep)
    root, run_dir = Path(run.results_dir).resolve(), Path(run.dir).resolve()
    validate_results_dir(run)
    if not resuming and not run.allow_outside_results_dir and (run_dir == root or root not in run_dir.parents):
        raise ConfigError("run.dir", f"{run_dir} is not inside run.results_dir={root}; choose a run.dir under it, "
                                     "set run.results_dir, or set run.allow_outside_results_dir=true")
    validate_run_dir_place(run_dir)
    problem = run_dir_problem(run_dir, root)
    if problem:
        raise ConfigError("run.dir", problem)


def validate_run_dir_place(run_dir: Path) -> None:
    """The run folder and its sweep folder (ledger.jsonl) are never `/`, a home, a system
    folder or the package (ownership.protected_problem): checked before anything looks inside."""
    from finellama_rl.ownership import protected_problem

    run_dir = Path(run_dir).resolve()
    for folder, what in ((run_dir, "the run folder"), (run_dir.parent, "its sweep folder (ledger.jsonl)")):
        problem = protected_problem(folder)
        if problem:
            raise ConfigError("run.dir", f"{what}: {problem}; choose a run.dir two levels below a folder of your "
                                         "own (<results>/<sweep>/<run>)")


def validate_results_dir(run: RunConfig) -> None:
    """run.results_dir and the folder the results index goes to (results.index_root) are
    never `/`, a home, a system folder or the package (ownership.protected_problem); also
    checked by evaluate, which adds to the index of any run folder."""
    from finellama_rl.ownership import protected_problem
    from finellama_rl.results import index_root

    problem = protected_problem(Path(run.results_dir))
    if problem:
        raise ConfigError("run.results_dir", f"{problem}; results go into a folder of their own, e.g. "
                                             "run.results_dir=~/finellama_results")
    problem = protected_problem(index_root(run)) if run.dir else None
    if problem:
        raise ConfigError("run.dir", f"the results index would go to {index_root(run)}: {problem}; choose a run.dir "
                                     "two levels below a folder of your own (<results>/<sweep>/<run>), or an "
                                     "absolute run.results_dir")


def _validate_sft_and_adapter(cfg: Config) -> None:
    """trainer=sft settings, model.adapter (RL from a trained adapter) and tracking."""
    t = cfg.trainer
    if t.algo == Algo.sft:
        if t.num_generations != 1:
            raise ConfigError("trainer.num_generations", f"SFT trains on one reference solution per prompt; set trainer.num_generations=1 (got {t.num_generations})")
        if t.sft.epochs is not None:
            _positive("trainer.sft.epochs", t.sft.epochs)
        if not 0 <= t.sft.warmup_ratio < 1:
            raise ConfigError("trainer.sft.warmup_ratio", f"must be in [0, 1), got {t.sft.warmup_ratio}")
        _non_negative("trainer.sft.dataloader_workers", t.sft.dataloader_workers)
        if t.sft.keep_best and not t.eval_every:
            raise ConfigError("trainer.sft.keep_best", "needs evaluations to compare: set trainer.eval_every=N (e.g. the save cadence)")
        if cfg.model.adapter:
            raise ConfigError("model.adapter", "SFT starts from the base model; model.adapter is for RL from an SFT run (trainer=grpo|ppo)")
    if cfg.model.adapter:
        if not t.lora.enabled:
            raise ConfigError("model.adapter", "stacks a new LoRA adapter on the given one; needs trainer.lora.enabled=true")
        if t.algo == Algo.ppo and t.ppo.value_head.value == "adapter":
            raise ConfigError("trainer.ppo.value_head", "a value adapter on top of model.adapter is not supported; use trainer.ppo.value_head=shared")
    import importlib.util

    if cfg.tracking.value in ("tensorboard", "all") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracking", f"{cfg.tracking.value} needs TensorBoard: pip install tensorboard (or tracking=none)")
    if cfg.tracking.value in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracking", f"{cfg.tracking.value} needs Weights & Biases: pip install wandb (or tracking=tensorboard)")


def validate(cfg: Config) -> None:
    """Cross-field checks on a resolved config. Raises ConfigError naming the key."""
    _validate_trainer(cfg.trainer, cfg.hardware)
    _validate_sft_and_adapter(cfg)
    validate_scoring(cfg)  # reward_model / judge sources, their GPUs, trainer=rm
    _validate_hardware(cfg.hardware)
    _validate_slurm_strings(cfg.hardware.slurm)
    for key in ("name", "sweep", "results_dir", "dir"):
        _no_control_chars(f"run.{key}", getattr(cfg.run, key))
    if cfg.trainer.quantization.enabled and cfg.hardware.bf16 and cfg.hardware.device == Device.cpu:
        raise ConfigError("hardware.bf16", "bf16 compute on CPU is not supported with a 4-bit base; use hardware=cpu")
    if cfg.model.tiny and cfg.data.source == DataSource.gsm8k and cfg.model.vocab_size < 256:
        raise ConfigError("model.vocab_size", "the tiny tokenizer needs at least 256 entries")
    eval_num_examples(cfg.eval.num_examples)
    _non_negative("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.shots is not None:  # None: the protocol's number of shots
        _non_negative("eval.shots", cfg.eval.shots)
    if cfg.eval.max_new_tokens is not None:  # None: the protocol's budget
        _positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive("eval.samples", cfg.eval.samples, "1 = greedy only, k > 1 adds pass@k")
    _positive("eval.sample_temperature", cfg.eval.sample_temperature, "e.g. eval.sample_temperature=0.7")
    _positive("data.validation_size", cfg.data.validation_size, "the validation split every selection reads")
    if cfg.data.source == DataSource.arithmetic:
        from finellama_rl.task.data import OPS

        if not 0 < cfg.data.heldout_pair_fraction < 0.5:
            raise ConfigError("data.heldout_pair_fraction", f"must be in (0, 0.5) (test and validation each get this "
                              f"share of the operand pairs), got {cfg.data.heldout_pair_fraction}")

        unknown = [op for op in cfg.data.ops if op not in OPS]
        if unknown or not cfg.data.ops:
            raise ConfigError("data.ops", f"{unknown or 'empty'}: choose some of {'|'.join(OPS)}, e.g. data.ops=[add]")
        _positive("data.max_operand", cfg.data.max_operand)
        _positive("data.num_train", cfg.data.num_train)
        _positive("data.num_test", cfg.data.num_test)
    _validate_ladder(cfg.ladder)
    if not 0 <= cfg.debug.step_sleep_s <= 600:
        raise ConfigError("debug.step_sleep_s", f"must be between 0 and 600 seconds, got {cfg.debug.step_sleep_s}")
    if cfg.debug.crash_after_step is not None and cfg.debug.crash_after_step % cfg.trainer.save_every:
        raise ConfigError("debug.crash_after_step", f"must be a multiple of trainer.save_every={cfg.trainer.save_every}")


def _validate_ladder(lad: LadderConfig) -> None:
    _non_negative("ladder.start_rung", lad.start_rung)
    _non_negative("ladder.max_resubmits", lad.max_resubmits)
    _positive("ladder.min_completion_tokens", lad.min_completion_tokens)
    _positive("ladder.min_prompt_tokens", lad.min_prompt_tokens)
    if not 0 < lad.length_step < 1:
        raise ConfigError("ladder.length_step", f"must be in (0, 1), got {lad.length_step}")
    if not 0 <= lad.planner_margin < 1:
        raise ConfigError("ladder.planner_margin", f"must be in [0, 1), got {lad.planner_margin}")
