"""GRPO through TRL 1.16's GRPOTrainer: the only module that imports TRL's GRPO.

Our fields are mapped to GRPOConfig one by one (no dict splat), so a renamed TRL
field fails here and nowhere else. TRL owns the loop; a thin subclass reports its
phases (generation, training) to our phase tracker and samples with explicit
decoding under a content-derived seed; a callback connects the loop to our monitor:
metrics go to metrics.jsonl, checkpoints are written by the HF Trainer into a
staging folder and committed (renamed) by us, eval_every runs our evaluation after
the step's metrics are logged, a stop request (SLURM signal, time limit) saves and
stops, and after every step a host-memory snapshot is kept (no step is redone after
an out-of-memory). Under torchrun the HF Trainer runs DDP; our callbacks write files
on rank 0 only, after barriers.

fp32 adapters: TRL casts trainable parameters of a quantized model to bf16 (see
`keep_trainable_fp32`); we cast them back before the optimizer exists, so LoRA
weights and AdamW state are fp32 as in our PPO; bf16 compute comes from autocast
(GRPOConfig.bf16 on GPUs with bf16).

Resume: our committed checkpoints use the HF Trainer's file names, so
`trainer.train(resume_from_checkpoint=...)` restores adapter, optimizer, scheduler,
RNG state, step counter and data position. transformers 5.23's Trainer loads
optimizer.pt, scheduler.pt and rng_state.pth with torch.load(weights_only=True)
(trainer.py `_load_rng_state` ~3865 with a numpy allow-list, `_load_optimizer_and_scheduler`
~3897-3946), so a pickle planted in a run folder is refused, not executed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from finellama_rl.job import distributed as dist
from finellama_rl.job.adapters import after_trl_init
from finellama_rl.checkpoint import checkpoint_dir, clear_staging, staging_root
from finellama_rl.config import Config, Device, TrainerConfig
from finellama_rl.ladder.rungs import Phase
from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.trainers.decoding import own_generation_config, sampling_kwargs
from finellama_rl.trainers.hf_bridge import bridge_callback, keep_trainable_fp32, train_or_load_last

log = logging.getLogger(__name__)

# TRL metric name -> ours
METRIC_NAMES = {
    "reward": "train/reward_mean",
    "reward_std": "train/reward_std",
    "loss": "train/loss",
    "kl": "train/kl",
    "entropy": "train/entropy",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "completions/mean_length": "train/completion_len",
    "clip_ratio/region_mean": "train/clip_frac",
    "frac_reward_zero_std": "train/frac_reward_zero_std",
}


def steps_per_generation(t: TrainerConfig) -> int:
    """TRL's steps_per_generation from trainer.generation_batch (0 = the whole step)."""
    return (t.generation_batch or t.micro_batch * t.grad_accum) // t.micro_batch


def build_grpo_config(cfg: Config, output_dir: Path):
    from trl import GRPOConfig

    t, hw = cfg.trainer, cfg.hardware
    decoding = sampling_kwargs(t, _NoTokenizer)
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=hw.device == Device.cpu,
        bf16=hw.bf16 and hw.device == Device.cuda,  # autocast; the trainable weights stay fp32
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule.value,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        steps_per_generation=steps_per_generation(cfg.trainer),
        num_generations=t.num_generations,
        num_iterations=t.num_iterations,
        max_completion_length=t.max_completion_tokens,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=decoding["top_k"],
        repetition_penalty=decoding["repetition_penalty"],
        generation_kwargs={k: decoding[k] for k in ("typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size",
                                                    "num_beams", "min_new_tokens")},
        beta=t.beta,
        epsilon=t.clip_epsilon,
        loss_type=t.loss_type.value,
        reward_weights=list(t.reward_weights) if t.reward_weights else None,
        max_steps=t.max_steps,
        seed=t.seed,
        gradient_checkpointing=t.activation_checkpointing,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=None,  # we prune committed checkpoints ourselves (keep_last)
        logging_steps=t.log_every,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # reward functions need the `answer` column
        dataloader_num_workers=0,
        log_completions=False,
    )


class _NoTokenizer:
    """sampling_kwargs without a tokenizer: TRL fills the token ids itself."""

    pad_token_id = eos_token_id = None


def _trainer_class():
    from trl import GRPOTrainer

    from finellama_rl.trainers.ppo_rollout import sampling_seed, seeded

    class Trainer(GRPOTrainer):
        """GRPOTrainer that reports its phases and samples under a content-derived seed
        with the model's generation_config out of the way (trainers/decoding.py)."""

        tracker = None

        def _generate(self, prompts: list):
            seed = sampling_seed(self.args.seed, self.state.global_step + 1, [str(p) for p in prompts])
            with self.tracker.phase(Phase.generation), seeded(seed, self.accelerator.device), \
                    own_generation_config(self.model):
                return super()._generate(prompts)

        def _generate_and_score_completions(self, inputs):
            with self.tracker.phase(Phase.scoring):
                return super()._generate_and_score_completions(inputs)

        def training_step(self, *args, **kwargs):
            with self.tracker.phase(Phase.training):
                return super().training_step(*args, **kwargs)

    return Trainer


# ------------------------------------------------------------------- callback


def _reward_sources(logs: Dict[str, Any]) -> Dict[str, float]:
    """TRL's rewards/<name>/mean -> train/reward/<name> (one per reward source)."""
    return {f"train/reward/{key.split('/')[1]}": value for key, value in logs.items()
            if key.startswith("rewards/") and key.endswith("/mean")}


def _callback(ctx: TrainContext, staging: Path):
    return bridge_callback(ctx, staging, METRIC_NAMES, gate=("loss", "reward"), extra_metrics=_reward_sources,
                           evaluate=lambda step, control: ctx.evaluate(ctx.policy, step))


def build_trainer(ctx: TrainContext):
    """TRL's GRPOTrainer (our subclass) for this run, trainable weights back in fp32."""
    from datasets import Dataset

    staging = staging_root(ctx.paths.checkpoints)
    callback = _callback(ctx, staging)
    Trainer = _trainer_class()
    Trainer.tracker = ctx.tracker
    trainer = Trainer(
        model=ctx.policy,
        reward_funcs=ctx.reward_funcs,
        args=build_grpo_config(ctx.cfg, staging),
        train_dataset=Dataset.from_list(ctx.train_rows),
        processing_class=ctx.tokenizer,
        callbacks=[callback],
    )
    after_trl_init(trainer)  # a frozen model.adapter under ours stays active (finellama_rl/job/adapters.py)
    trainer.cast_back_to_fp32 = keep_trainable_fp32(trainer.model)
    log.info("trainable parameters kept in fp32 (%d cast back from TRL's bf16)", trainer.cast_back_to_fp32)
    trainer.remove_callback(_printer_callback_type())
    return trainer, callback


def train(ctx: TrainContext) -> TrainOutcome:
    trainer, callback = build_trainer(ctx)
    train_or_load_last(trainer, ctx)
    if dist.is_main():
        clear_staging(ctx.paths.checkpoints)  # the HF Trainer leaves a model card there
    step = trainer.state.global_step
    if callback.outcome_reason and not checkpoint_dir(ctx.paths.checkpoints, step).exists() and step > ctx.start_step:
        log.warning("stopped at step %d without a checkpoint of that step", step)
    return TrainOutcome(final_step=step, stopped_early=bool(callback.outcome_reason), stop_reason=callback.outcome_reason)


def _printer_callback_type():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback
