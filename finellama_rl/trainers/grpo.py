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

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict

import torch

from finellama_rl import distributed as dist
from finellama_rl.adapters import after_trl_init
from finellama_rl.checkpoint import checkpoint_dir, clear_staging, commit_checkpoint, staging_root
from finellama_rl.config import Config, Device
from finellama_rl.ladder import Phase
from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.trainers.decoding import own_generation_config, sampling_kwargs
from finellama_rl.trainers.snapshot import adapter_state, host_copy, rng_state

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


def steps_per_generation(cfg: Config) -> int:
    """TRL's steps_per_generation from trainer.generation_batch (0 = the whole step)."""
    t = cfg.trainer
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
        steps_per_generation=steps_per_generation(cfg),
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


def keep_trainable_fp32(model) -> int:
    """Undo TRL's bf16 cast of trainable parameters; returns how many were cast back.

    TRL 1.16, trl/trainer/grpo_trainer.py: it detects a quantized model
    (`_is_quantized_model = getattr(model, "is_loaded_in_4bit", ...)`, ~line 362) and
    then casts every trainable parameter to bf16 (`param.data = param.data.to(
    torch.bfloat16)`, ~line 538), also for a PeftModel passed in and also on CPU.
    AdamW on bf16 LoRA weights leaves most lora_A entries unchanged at lr 1e-5 and caps
    lora_B near 2^-8 (docs/LOG.md, benchmarks/bench_training.py). The optimizer is
    created later, in train(), so casting back here gives fp32 weights and fp32 state.
    """
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            n += 1
    return n


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


# ------------------------------------------------------------------ snapshots


def capture(model, optimizer, scheduler, state, reuse: dict[str, Any] | None = None) -> Dict[str, Any]:
    """A resumable copy of the trainer after a step, in host memory. `reuse`: a payload
    nobody reads any more (SnapshotHolder.spare) whose tensors are overwritten (host_copy)."""
    from finellama_rl.trainers.value_head import is_peft

    reuse = reuse or {}
    if is_peft(model):
        weights = adapter_state(model, reuse=reuse.get("weights"))
        config = copy.deepcopy(model.peft_config["default"])
    else:
        weights, config = host_copy(model.state_dict(), reuse.get("weights")), None
    trainer_state = copy.copy(state)  # serialised only if written; its log history is append-only
    trainer_state.log_history = list(state.log_history)
    return {"weights": weights, "adapter_config": config, "optimizer": host_copy(optimizer.state_dict(), reuse.get("optimizer")),
            "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": rng_state(),  # rng_state() is a fresh host copy
            "trainer_state": trainer_state,
            "rng_file": "rng_state.pth" if dist.world() <= 1 else f"rng_state_{dist.rank()}.pth"}


def write_payload(folder: Path, payload: Dict[str, Any]) -> None:
    """The HF Trainer's checkpoint layout, so TRL resumes from it like from a checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = {k: v.contiguous() for k, v in payload["weights"].items()}
    if payload["adapter_config"] is not None:
        save_file(weights, str(folder / "adapter_model.safetensors"))
        payload["adapter_config"].save_pretrained(str(folder))
    else:
        save_file(weights, str(folder / "model.safetensors"))
    torch.save(payload["optimizer"], folder / "optimizer.pt")
    torch.save(payload["scheduler"], folder / "scheduler.pt")
    torch.save(payload["rng"], folder / payload["rng_file"])  # read back with weights_only=True
    (folder / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(payload["trainer_state"]), sort_keys=True))


# ------------------------------------------------------------------- callback


def _callback(ctx: TrainContext, staging: Path):
    from transformers import TrainerCallback

    class FinellamaCallback(TrainerCallback):
        """Bridges the HF Trainer loop to our monitor, snapshots and checkpoint layout."""

        def __init__(self):
            self.outcome_reason = ""
            self.last_tokens = 0.0
            self.eval_step = None

        def on_train_begin(self, args, state, control, **kw):
            self.last_tokens = float(state.num_input_tokens_seen or 0)

        def on_step_begin(self, args, state, control, **kw):
            ctx.tracker.step = state.global_step + 1

        def on_pre_optimizer_step(self, args, state, control, **kw):
            ctx.tracker.current = Phase.optimizer

        def on_optimizer_step(self, args, state, control, **kw):
            ctx.tracker.current = Phase.other

        def on_step_end(self, args, state, control, **kw):
            decision = ctx.monitor.decide(state.global_step)
            control.should_save = decision.save
            if decision.evaluate:  # after the step's metrics are logged (on_log), so a failed eval loses none
                self.eval_step = state.global_step
                control.should_log = True
            if decision.stop:
                self.outcome_reason = decision.reason
                control.should_training_stop = True
            payload = capture(kw["model"], kw["optimizer"], kw["lr_scheduler"], state, ctx.snapshots.spare)
            ctx.snapshots.take(state.global_step, payload, write_payload, eval_pending=decision.evaluate,
                               data_position=state.global_step * ctx.cfg.trainer.prompts_per_step)
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs and "reward" not in logs:
                return  # the end-of-training summary; ours is training_stats.json
            metrics = {ours: logs[theirs] for theirs, ours in METRIC_NAMES.items() if theirs in logs}
            for key, value in logs.items():
                if key.startswith("rewards/") and key.endswith("/mean"):
                    metrics[f"train/reward/{key.split('/')[1]}"] = value
            tokens = float(logs.get("num_tokens", self.last_tokens))
            ctx.monitor.log(state.global_step, metrics, tokens=tokens - self.last_tokens)  # writes on rank 0
            self.last_tokens = tokens
            if self.eval_step == state.global_step:
                self.eval_step = None
                ctx.evaluate(ctx.policy, state.global_step)  # rank 0 evaluates, the others wait
                ctx.snapshots.mark(eval_pending=False)

        def on_save(self, args, state, control, **kw):
            digests = dist.rank_digests([p for p in ctx.policy.parameters() if p.requires_grad])
            dist.barrier()  # every rank has written its part (rng_state_<rank>.pth)
            if dist.is_main():
                staged = staging / f"checkpoint-{state.global_step}"
                info = {"data_position": state.global_step * ctx.cfg.trainer.prompts_per_step,
                        "rank_weight_digests": digests, **ctx.extra_state}
                final = commit_checkpoint(ctx.paths.checkpoints, staged, state.global_step, info, ctx.cfg.trainer.keep_last)
                log.info("checkpoint %s", final)
            dist.barrier()

    return FinellamaCallback()


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
    after_trl_init(trainer)  # a frozen model.adapter under ours stays active (finellama_rl/adapters.py)
    trainer.cast_back_to_fp32 = keep_trainable_fp32(trainer.model)
    log.info("trainable parameters kept in fp32 (%d cast back from TRL's bf16)", trainer.cast_back_to_fp32)
    trainer.remove_callback(_printer_callback_type())
    return trainer, callback


def train(ctx: TrainContext) -> TrainOutcome:
    trainer, callback = build_trainer(ctx)
    resume = str(ctx.resume_from) if ctx.resume_from else None
    trainer.train(resume_from_checkpoint=resume)
    if dist.is_main():
        clear_staging(ctx.paths.checkpoints)  # the HF Trainer leaves a model card there
    step = trainer.state.global_step
    if callback.outcome_reason and not checkpoint_dir(ctx.paths.checkpoints, step).exists() and step > ctx.start_step:
        log.warning("stopped at step %d without a checkpoint of that step", step)
    return TrainOutcome(final_step=step, stopped_early=bool(callback.outcome_reason), stop_reason=callback.outcome_reason)


def _printer_callback_type():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback
