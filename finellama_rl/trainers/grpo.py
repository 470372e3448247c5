"""GRPO through TRL 1.16's GRPOTrainer: the only module that imports TRL.

Our fields are mapped to GRPOConfig one by one (no dict splat), so a renamed TRL
field fails here and nowhere else. TRL owns the loop; a callback connects it to
our monitor: metrics go to metrics.jsonl, checkpoints are written by the HF
Trainer into a staging folder and committed (renamed) by us, eval_every runs our
evaluation, and a stop request (SLURM signal, time limit) saves and stops.

Resume: our committed checkpoints use the HF Trainer's file names, so
`trainer.train(resume_from_checkpoint=...)` restores adapter, optimizer,
scheduler, RNG state, step counter and data position.
"""
from __future__ import annotations

import logging
from pathlib import Path

from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.checkpoint import checkpoint_dir, clear_staging, commit_checkpoint, staging_root
from finellama_rl.config import Config, Device

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


def build_grpo_config(cfg: Config, output_dir: Path):
    from trl import GRPOConfig

    t, hw = cfg.trainer, cfg.hardware
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=hw.device == Device.cpu,
        bf16=hw.bf16 and hw.device == Device.cuda,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule.value,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_tokens,
        temperature=t.temperature,
        top_p=t.top_p,
        beta=t.beta,
        epsilon=t.clip_epsilon,
        loss_type=t.loss_type.value,
        reward_weights=list(t.reward_weights) if t.reward_weights else None,
        max_steps=t.max_steps,
        seed=t.seed,
        gradient_checkpointing=t.activation_checkpointing,
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


def _callback(ctx: TrainContext, staging: Path):
    from transformers import TrainerCallback

    class FinellamaCallback(TrainerCallback):
        """Bridges the HF Trainer loop to our monitor and checkpoint layout."""

        def __init__(self):
            self.outcome_reason = ""
            self.last_tokens = 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs and "reward" not in logs:
                return  # the end-of-training summary; ours is training_stats.json
            metrics = {ours: logs[theirs] for theirs, ours in METRIC_NAMES.items() if theirs in logs}
            for key, value in logs.items():
                if key.startswith("rewards/") and key.endswith("/mean"):
                    metrics[f"train/reward/{key.split('/')[1]}"] = value
            tokens = float(logs.get("num_tokens", self.last_tokens))
            ctx.monitor.log(state.global_step, metrics, tokens=tokens - self.last_tokens)
            self.last_tokens = tokens

        def on_step_end(self, args, state, control, **kw):
            decision = ctx.monitor.decide(state.global_step)
            control.should_save = decision.save
            if decision.evaluate:
                ctx.evaluate(kw["model"], state.global_step)
            if decision.stop:
                self.outcome_reason = decision.reason
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kw):
            staged = staging / f"checkpoint-{state.global_step}"
            state_info = {"data_position": state.global_step * ctx.cfg.trainer.prompts_per_step, **ctx.extra_state}
            final = commit_checkpoint(ctx.paths.checkpoints, staged, state.global_step, state_info, ctx.cfg.trainer.keep_last)
            log.info("checkpoint %s", final)

    return FinellamaCallback()


def train(ctx: TrainContext) -> TrainOutcome:
    from datasets import Dataset
    from trl import GRPOTrainer

    staging = staging_root(ctx.paths.checkpoints)
    callback = _callback(ctx, staging)
    trainer = GRPOTrainer(
        model=ctx.policy,
        reward_funcs=ctx.reward_funcs,
        args=build_grpo_config(ctx.cfg, staging),
        train_dataset=Dataset.from_list(ctx.train_rows),
        processing_class=ctx.tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(_printer_callback_type())
    resume = str(ctx.resume_from) if ctx.resume_from else None
    trainer.train(resume_from_checkpoint=resume)
    clear_staging(ctx.paths.checkpoints)  # the HF Trainer leaves a model card there
    step = trainer.state.global_step
    if callback.outcome_reason and not checkpoint_dir(ctx.paths.checkpoints, step).exists() and step > ctx.start_step:
        log.warning("stopped at step %d without a checkpoint of that step", step)
    return TrainOutcome(final_step=step, stopped_early=bool(callback.outcome_reason), stop_reason=callback.outcome_reason)


def _printer_callback_type():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback
