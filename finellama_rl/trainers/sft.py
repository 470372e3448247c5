"""Supervised fine-tuning through TRL 1.16's SFTTrainer, behind the same
`train(ctx) -> TrainOutcome` interface as GRPO and PPO.

    python -m finellama_rl.train trainer=sft model=qwen2.5-3b data=gsm8k trainer.sft.epochs=1
    python -m finellama_rl.launch experiment=sft_1epoch          (the seed's SFT presets: sft_*)

Why: the usual recipe is SFT first, then RL from the SFT policy
(`model.adapter=<this run folder>`). Each training row is the run's prompt (the
same chat-templated text RL and evaluation use) and, as the completion, the
problem's reference solution; the loss covers completion tokens only, and TRL
appends the tokenizer's end-of-turn token so the model learns to stop.

What is shared with the RL trainers (the same shape as trainers/grpo.py): the 4-bit
base with LoRA (model.load_policy), metrics through the monitor (metrics.jsonl, the
progress line, tracking), checkpoints written by the HF Trainer into a staging folder
and committed by rank 0, a host-memory snapshot after every step and phase
attribution for the OOM ladder, resume
(the HF Trainer restores adapter, optimizer, scheduler, RNG and skips the batches
already seen, so a run resumed mid-epoch continues at the same sample), the OOM
ladder's rungs (micro_batch and grad_accum map to per_device_train_batch_size and
gradient_accumulation_steps; the sample order does not depend on them), and
baseline/final accuracy by generation (train.py).

SFT's own parts: trainer.sft.epochs sets max_steps (config.sft_max_steps);
evaluations at trainer.eval_every measure, on the validation split (task/splits.py;
never the test split), the teacher-forced loss on the reference solutions (eval/loss)
and, with best_metric=accuracy, greedy accuracy by generation (after the step's metrics
line, like GRPO's eval_every; the values go to best_checkpoint.json and tracking); with
trainer.sft.keep_best the best checkpoint is saved (even off the save schedule), never
pruned, recorded in best_checkpoint.json and restored at the end (the final evaluation,
on the test split, is of it).

Correctness trap: SFTTrainer casts every trainable parameter of a quantized model
to bf16 (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights
are converted to bf16", about line 902), also on CPU; bf16 Adam then loses small
updates. We cast back to fp32 right after building the trainer (hf_bridge.keep_trainable_fp32;
the optimizer is created later, in train()).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from finellama_rl.job import distributed as dist
from finellama_rl.checkpoint import (
    checkpoint_dir,
    clear_staging,
    staging_root,
)
from finellama_rl.config import BestMetric, Config, Device
from finellama_rl.ladder.rungs import Phase
from finellama_rl.fileio import atomic_write_json, is_finite, is_whole, read_json_object
from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.trainers.hf_bridge import bridge_callback, keep_trainable_fp32, train_or_load_last
from finellama_rl.results import RunPaths

log = logging.getLogger(__name__)


# TRL/HF log name -> ours
METRIC_NAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "entropy": "train/entropy",
    "mean_token_accuracy": "train/token_accuracy",
    "epoch": "train/epoch",
}


def sft_rows(train_rows: List[Dict[str, str]], protocol) -> List[Dict[str, str]]:
    """Prompt-completion rows: the run's prompt, and as target what a perfect model
    writes under the evaluation protocol (task/protocols.py target_text)."""
    from finellama_rl.task.protocols import target_text

    return [{"prompt": r["prompt"], "completion": target_text(protocol, r["answer"])} for r in train_rows]


def build_sft_config(cfg: Config, output_dir: Path):
    """Our fields mapped one by one onto TRL's SFTConfig (no dict splat)."""
    from trl import SFTConfig as TRLSFTConfig

    t, hw = cfg.trainer, cfg.hardware
    warmup = t.warmup_steps or t.sft.warmup_ratio  # HF: an int is steps, a float in [0, 1) a ratio
    return TRLSFTConfig(
        output_dir=str(output_dir),
        use_cpu=hw.device == Device.cpu,
        bf16=hw.bf16 and hw.device == Device.cuda,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule.value,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch,
        per_device_eval_batch_size=max(cfg.eval.batch_size, t.micro_batch),
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        max_length=t.max_prompt_tokens + t.max_completion_tokens,
        completion_only_loss=True,
        seed=t.seed,
        gradient_checkpointing=t.activation_checkpointing,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=None,  # we prune committed checkpoints ourselves (keep_last, keep_best)
        eval_strategy="no",  # evaluations run from our callback at trainer.eval_every
        logging_steps=t.log_every,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=t.sft.dataloader_workers,
        dataset_num_proc=None,
    )


class BestTracker:
    """The best evaluation so far by trainer.sft.best_metric, kept in best_checkpoint.json."""

    def __init__(self, cfg: Config, run_root: Path, start_step: int):
        self.metric = cfg.trainer.sft.best_metric
        self.path = RunPaths(run_root).best_checkpoint
        self.history: List[Dict[str, Any]] = []
        self.step: Optional[int] = None
        self.value: Optional[float] = None
        doc = read_json_object(self.path, "the best checkpoint so far", require={"history": list})
        if doc is not None:  # resume: keep what was measured up to the checkpoint we resume from
            valid = [h for h in doc["history"] if isinstance(h, dict) and is_whole(h.get("step")) and h["step"] >= 0
                     and is_finite(h.get("value"))]
            if len(valid) < len(doc["history"]):
                log.warning("%s: left out %d history entries without a step >= 0 and a finite value",
                            self.path, len(doc["history"]) - len(valid))
            self.history = [h for h in valid if h["step"] <= start_step]
            for h in self.history:
                self.offer(h["step"], h["value"], record=False)

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.metric == BestMetric.accuracy else value < self.value

    def offer(self, step: int, value: float, record: bool = True) -> bool:
        if record:
            self.history.append({"step": step, "value": value})
        if self.better(value):
            self.step, self.value = step, value
            return True
        return False

    def write(self, checkpoints: Path, restored: bool = False) -> None:
        ckpt = checkpoint_dir(checkpoints, self.step) if self.step is not None else None
        atomic_write_json(self.path, {
            "metric": self.metric.value, "mode": "max" if self.metric == BestMetric.accuracy else "min",
            "split": "validation",  # what every value below was measured on (the test split is only reported)
            "step": self.step, "value": self.value,
            "checkpoint": str(ckpt) if ckpt is not None and ckpt.exists() else None,
            "restored": restored, "history": self.history})


def eval_loss_rows(cfg: Config, tokenizer) -> List[Dict[str, str]]:
    """The validation problems the evaluations during training use, as prompt-completion
    rows (for eval/loss; keep-best selects on them, never on the test split)."""
    from finellama_rl.task.data import load_problems, with_prompts
    from finellama_rl.eval.core import select_problems
    from finellama_rl.task.protocols import prompt_format

    problems = select_problems(load_problems(cfg.data, "validation"), cfg.eval.num_examples)
    fmt = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)  # zero-shot, like the training prompts
    rows, _ = with_prompts(problems, tokenizer, fmt, cfg.trainer.max_prompt_tokens)
    return sft_rows(rows, cfg.eval.protocol)


def measure(trainer, ctx: TrainContext, model, step: int) -> Tuple[float, Dict[str, float]]:
    """One evaluation during SFT, on the validation split: eval/loss (teacher-forced on its
    targets) always, greedy accuracy by generation (evals/step_N.json) unless best_metric=loss.
    Returns (value of trainer.sft.best_metric, the scalars), the same on every rank."""
    import torch

    scalars = {"eval/loss": float(trainer.evaluate()["eval_loss"])}  # every rank takes part
    if ctx.cfg.trainer.sft.best_metric == BestMetric.loss:
        return scalars["eval/loss"], scalars
    summary = ctx.evaluate(model, step)  # rank 0 generates and writes; None on the others
    device = next(p for p in model.parameters()).device  # NCCL broadcasts device tensors only
    value = torch.tensor([summary["accuracy"][summary["primary"]] if summary else 0.0], device=device)
    dist.broadcast_([value])  # every rank must take the same keep-best decision
    scalars["eval/accuracy"] = float(value.item())
    return scalars["eval/accuracy"], scalars


def _trainer_class():
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        """SFTTrainer that reports its training phase to our phase tracker (OOM attribution)."""

        tracker = None

        def training_step(self, *args, **kwargs):
            with self.tracker.phase(Phase.training):
                return super().training_step(*args, **kwargs)

    return Trainer


def _callback(ctx: TrainContext, staging: Path, best: Optional[BestTracker], trainer_ref: Dict[str, Any]):
    """The shared HF bridge; evaluations measure (loss, and accuracy with best_metric=accuracy)
    and, with keep_best, offer the value to the tracker: a new best is saved right after the
    log and never pruned. trainer_ref["trainer"] is set once the trainer exists (measure needs it)."""

    def evaluate(step: int, control) -> None:
        value, scalars = measure(trainer_ref["trainer"], ctx, ctx.policy, step)
        ctx.monitor.track(step, scalars)
        if best is not None and best.offer(step, value):
            control.should_save = True  # the best is always restorable (saved right after this log)
            log.info("step %d: best %s so far (%.4f)", step, best.metric.value, value)

    def after_commit() -> None:
        if best is not None:
            best.write(ctx.paths.checkpoints)

    return bridge_callback(ctx, staging, METRIC_NAMES, evaluate=evaluate,
                           evaluate_at_end=best is not None,  # keep_best also weighs the final weights
                           keep=lambda: [best.step] if best is not None and best.step is not None else [],
                           after_commit=after_commit)


def restore_best(policy, best: BestTracker, checkpoints: Path) -> Optional[int]:
    """Load the best checkpoint's adapter into the live policy; returns its step."""
    from finellama_rl.job.adapters import load_adapter_weights

    if best.step is None or not checkpoint_dir(checkpoints, best.step).exists():
        log.warning("trainer.sft.keep_best: no evaluated checkpoint to restore; keeping the last weights")
        return None
    load_adapter_weights(policy, checkpoint_dir(checkpoints, best.step))
    if dist.is_main():
        best.write(checkpoints, restored=True)
    log.info("restored the best checkpoint: step %d (%s %.4f)", best.step, best.metric.value, best.value)
    return best.step


def build_trainer(ctx: TrainContext, best: Optional[BestTracker]):
    """TRL's SFTTrainer (our subclass) for this run, trainable weights back in fp32."""
    from datasets import Dataset, disable_progress_bars
    from transformers.trainer_callback import PrinterCallback

    disable_progress_bars()  # datasets' map bars for a few hundred rows are noise in job logs
    cfg = ctx.cfg
    trainer_ref: Dict[str, Any] = {}
    callback = _callback(ctx, staging_root(ctx.paths.checkpoints), best, trainer_ref)
    Trainer = _trainer_class()
    Trainer.tracker = ctx.tracker
    trainer = Trainer(
        model=ctx.policy,
        args=build_sft_config(cfg, staging_root(ctx.paths.checkpoints)),
        train_dataset=Dataset.from_list(sft_rows(ctx.train_rows, cfg.eval.protocol)),
        eval_dataset=Dataset.from_list(eval_loss_rows(cfg, ctx.tokenizer)) if cfg.trainer.eval_every else None,
        processing_class=ctx.tokenizer,
        callbacks=[callback],
    )
    trainer_ref["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)
    n = keep_trainable_fp32(trainer.model)
    log.info("trainable parameters kept in fp32 (%d cast back from TRL's bf16)", n)
    return trainer, callback


def train(ctx: TrainContext) -> TrainOutcome:
    if not ctx.train_rows:
        raise ValueError("no training rows: every prompt is longer than trainer.max_prompt_tokens?")
    best = BestTracker(ctx.cfg, ctx.paths.root, ctx.start_step) if ctx.cfg.trainer.sft.keep_best else None
    trainer, callback = build_trainer(ctx, best)
    train_or_load_last(trainer, ctx)
    if dist.is_main():
        clear_staging(ctx.paths.checkpoints)  # the HF Trainer leaves a model card there
    step = trainer.state.global_step
    if callback.outcome_reason:
        return TrainOutcome(final_step=step, stopped_early=True, stop_reason=callback.outcome_reason)
    restored = restore_best(ctx.policy, best, ctx.paths.checkpoints) if best is not None else None
    return TrainOutcome(final_step=step, stopped_early=False, restored_step=restored)
