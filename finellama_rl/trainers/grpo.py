"""GRPO through TRL 1.16's GRPOTrainer: the only module that imports TRL's GRPO.

Our fields are mapped to GRPOConfig one by one (no dict splat), so a renamed TRL
field fails here and nowhere else. TRL owns the loop; a thin subclass reports its
phases (generation, scoring, training) to our phase tracker, samples with explicit
decoding and keyed noise, and scores each step in one call (below); a callback
connects the loop to our monitor:
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

One gradient per step, whatever the micro batches, generate calls and devices (issue
20): TRL normalises once per scoring call (`_generate_and_score_completions`): dapo's
token count, `scale_rewards=batch` and `reward_std` cover that call only. So TRL always
gets the whole step (steps_per_generation = grad_accum, TRL's default), and
trainer.generation_batch only chunks the generate() calls inside that one call
(`_generate_single_turn`), each sequence sampled under its key (seed, step, its position
in the step's global batch: finellama_rl/job/sampling.py). TRL logs entropy, kl and the
clip ratios as the mean of per-micro-batch token means; `compute_loss`/`log` re-weight
them by each micro batch's tokens. The TRL internals relied on (TRL is pinned ~=1.16)
are checked by tests/test_grpo_split.py, and at run time: a scoring call whose
generate() did not go through the keyed sampler raises.

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
from typing import Any, Callable, Dict, List, Optional

from finellama_rl.job import distributed as dist
from finellama_rl.job.adapters import after_trl_init
from finellama_rl.checkpoint import checkpoint_dir, clear_staging, staging_root
from finellama_rl.config import Config, Device, TrainerConfig, Truncation
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
    "completions/clipped_ratio": "train/frac_truncated",
    "clip_ratio/region_mean": "train/clip_frac",
    "frac_reward_zero_std": "train/frac_reward_zero_std",
}
# TRL metrics logged as one token mean per micro step (grpo_trainer.py `_compute_loss`,
# global_masked_mean): re-weighted by each micro step's tokens before they are averaged
TOKEN_MEAN_METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
TRUNCATION_REWARD = "truncation"  # the reward function of trainer.truncation=penalty: train/reward/truncation


def steps_per_generation(t: TrainerConfig) -> int:
    """TRL's steps_per_generation: always the whole step (grad_accum micro batches), so that
    TRL scores, normalises and splits a step's completions together (its dapo token count
    and reward statistics cover the step on every device). trainer.generation_batch chunks
    the generate() calls inside that one scoring call (Trainer._generate_single_turn)."""
    return t.grad_accum


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
        scale_rewards=t.advantage_scaling.value,  # group | batch | none: TRL's names and meanings
        mask_truncated_completions=t.truncation == Truncation.mask,
        reward_weights=reward_weights(t),
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


def reward_weights(t: TrainerConfig) -> Optional[List[float]]:
    """TRL's reward_weights: ours, and 1 for the truncation penalty's reward function."""
    weights = list(t.reward_weights) if t.reward_weights else None
    if weights is not None and t.truncation == Truncation.penalty:
        weights.append(1.0)
    return weights


def truncation_penalty(t: TrainerConfig, stop_ids) -> Callable:
    """trainer.truncation=penalty as a reward function: -truncation_penalty for a completion
    whose last id is neither EOS nor pad (TRL's own truncation test: it passes the ids cut
    after the first EOS), 0 otherwise; logged as train/reward/truncation."""
    def truncation(completions, completion_ids, **kw):
        return [-t.truncation_penalty if ids and ids[-1] not in truncation.stop_ids else 0.0 for ids in completion_ids]

    truncation.__name__ = TRUNCATION_REWARD
    truncation.stop_ids = set(stop_ids)  # build_trainer adds TRL's eos_token_ids (its generate() stops on them)
    return truncation


class _NoTokenizer:
    """sampling_kwargs without a tokenizer: TRL fills the token ids itself."""

    pad_token_id = eos_token_id = None


def _trainer_class():
    from trl import GRPOTrainer

    class Trainer(GRPOTrainer):
        """GRPOTrainer that reports its phases, scores a whole step in one call with its
        generate() calls chunked and keyed, re-weights TRL's per-micro-step token means,
        and keeps the model's generation_config out of the way (trainers/decoding.py)."""

        tracker = None
        generation_chunk = 0  # sequences per generate() call (trainer.generation_batch; 0 = the whole step)
        eos_bias: Optional[Dict[int, float]] = None  # debug.eos_logit_bias (tests: uneven lengths)

        def _generate(self, prompts: list):
            with self.tracker.phase(Phase.generation), own_generation_config(self.model):
                return super()._generate(prompts)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            """The step's generate() calls, generation_chunk sequences each, every sequence
            sampled under its key: rank r holds positions [r n, (r + 1) n) of the step's
            global batch (TRL's contiguous split: process_slice in
            _generate_and_score_completions)."""
            from finellama_rl.job.sampling import keyed_generate, row_keys

            if self.use_vllm or self.use_transformers_continuous_batching or images is not None:
                raise NotImplementedError("keyed sampling covers TRL's transformers generate() path only")
            n = len(prompt_ids)
            size, first = self.generation_chunk or n, self.accelerator.process_index * n
            model = self.accelerator.unwrap_model(self.model_wrapped)  # what TRL calls .generate on
            completions = []
            for start in range(0, n, size):
                chunk = prompt_ids[start:start + size]
                keys = row_keys(self.args.seed, self.state.global_step + 1, range(first + start, first + start + len(chunk)))
                with keyed_generate(model, keys, self.eos_bias) as sampled:
                    ids, _ = super()._generate_single_turn(chunk, None, multimodal_fields, num_generations,
                                                           has_tool_images)
                if not sampled.calls:
                    raise RuntimeError("TRL's _generate_single_turn no longer calls model.generate(): keyed sampling "
                                       "was bypassed (TRL is pinned ~=1.16; see tests/test_grpo_split.py)")
                completions.extend(ids)
            return completions, None

        def _generate_and_score_completions(self, inputs):
            with self.tracker.phase(Phase.scoring):
                return super()._generate_and_score_completions(inputs)

        def training_step(self, *args, **kwargs):
            with self.tracker.phase(Phase.training):
                return super().training_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Also keep this micro step's loss tokens (the mask TRL's metrics use), so that
            `log` can weight TRL's per-micro-step token means by them: unweighted, a micro
            batch of few (under truncation=mask: no) tokens weighed like a full one, and
            train/entropy followed trainer.micro_batch (6.22 -> 4.67 at micro batch 1)."""
            if self.model.training:
                mask = inputs["completion_mask"]
                mask = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
                self.__dict__.setdefault("_token_weights", []).append(mask.sum().float())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, start_time=None):
            import torch

            weights, metrics = self.__dict__.pop("_token_weights", []), self._metrics["train"]
            if weights and self.model.training:
                w = self.accelerator.reduce(torch.stack(weights), reduction="sum").tolist()  # one collective per line
                for key in TOKEN_MEAN_METRICS:
                    if metrics.get(key) and len(metrics[key]) == len(w):
                        metrics[key] = [sum(v * n for v, n in zip(metrics[key], w)) / max(sum(w), 1.0)]
            return super().log(logs, start_time)

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
    t = ctx.cfg.trainer
    Trainer = _trainer_class()
    Trainer.tracker = ctx.tracker
    Trainer.generation_chunk = t.generation_batch
    bias = ctx.cfg.debug.eos_logit_bias
    Trainer.eos_bias = {ctx.tokenizer.eos_token_id: bias} if bias else None
    funcs = list(ctx.reward_funcs)
    if t.truncation == Truncation.penalty:
        funcs.append(truncation_penalty(t, [ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id]))
    trainer = Trainer(
        model=ctx.policy,
        reward_funcs=funcs,
        args=build_grpo_config(ctx.cfg, staging),
        train_dataset=Dataset.from_list(ctx.train_rows),
        processing_class=ctx.tokenizer,
        callbacks=[callback],
    )
    after_trl_init(trainer)  # a frozen model.adapter under ours stays active (finellama_rl/job/adapters.py)
    if t.truncation == Truncation.penalty:
        funcs[-1].stop_ids.update(trainer.eos_token_ids)
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
