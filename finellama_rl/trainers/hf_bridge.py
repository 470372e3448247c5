"""What the two HF-Trainer-based trainers (TRL's GRPOTrainer and SFTTrainer) share.

- `keep_trainable_fp32`: undo TRL's bf16 cast of trainable parameters.
- `capture` / `write_payload`: the host-memory snapshot after every step, written in
  the HF Trainer's checkpoint layout so that TRL resumes from it like from a checkpoint.
- `bridge_callback(...)`: the TrainerCallback that connects the HF loop to ours: phase
  attribution for the OOM ladder, the monitor's save/stop/evaluate decisions, a
  snapshot after every step, metrics lines, evaluations after the step's metrics line
  (so a failed evaluation loses none), and checkpoints committed by rank 0 after
  barriers. Each trainer passes its metric names and what an evaluation does.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from finellama_rl.job import distributed as dist
from finellama_rl.checkpoint import commit_checkpoint
from finellama_rl.ladder.rungs import Phase
from finellama_rl.trainers.base import TrainContext
from finellama_rl.job.snapshot import adapter_state, host_copy, rng_state

log = logging.getLogger(__name__)


def keep_trainable_fp32(model) -> int:
    """Undo TRL's bf16 cast of trainable parameters; returns how many were cast back.

    TRL 1.16, trl/trainer/grpo_trainer.py: it detects a quantized model
    (`_is_quantized_model = getattr(model, "is_loaded_in_4bit", ...)`, ~line 362) and
    then casts every trainable parameter to bf16 (`param.data = param.data.to(
    torch.bfloat16)`, ~line 538), also for a PeftModel passed in and also on CPU;
    sft_trainer.py does the same (~line 902, "When using QLoRA, the PEFT adapter
    weights are converted to bf16"). AdamW on bf16 LoRA weights leaves most lora_A
    entries unchanged at lr 1e-5 and caps lora_B near 2^-8 (docs/LOG.md,
    benchmarks/bench_training.py). The optimizer is created later, in train(), so
    casting back here gives fp32 weights and fp32 state.
    """
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            n += 1
    return n


# ------------------------------------------------------------------ snapshots


def capture(model, optimizer, scheduler, state, reuse: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
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


def bridge_callback(ctx: TrainContext, staging: Path, metric_names: Mapping[str, str], *,
                    evaluate: Callable[[int, Any], None], gate: Sequence[str] = ("loss",),
                    extra_metrics: Callable[[Dict[str, Any]], Dict[str, float]] = lambda logs: {},
                    evaluate_at_end: bool = False,
                    keep: Callable[[], List[int]] = list,
                    after_commit: Callable[[], None] = lambda: None):
    """The TrainerCallback of a TRL trainer run.

    metric_names: the HF/TRL log name -> ours (train/...); a log holding none of the `gate`
    names (the end-of-training summary, eval_* logs) is not a metrics line. extra_metrics(logs): more
    of ours from the same logs. evaluate(step, control): an evaluation, run right after the
    metrics line of a step the monitor chose (and of the last step if evaluate_at_end); it
    may set control.should_save. keep(): checkpoint steps never pruned; after_commit():
    called on rank 0 after each commit.
    """
    from transformers import TrainerCallback

    t = ctx.cfg.trainer

    class BridgeCallback(TrainerCallback):
        """Bridges the HF Trainer loop to our monitor, evaluations, snapshots and checkpoints."""

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
            step = state.global_step
            decision = ctx.monitor.decide(step)
            control.should_save = decision.save
            last = evaluate_at_end and step >= t.max_steps and not decision.stop
            if decision.evaluate or last:  # after the step's metrics are logged (on_log), so a failed eval loses none
                self.eval_step = step
                control.should_log = True
            if decision.stop:
                self.outcome_reason = decision.reason
                control.should_training_stop = True
            payload = capture(kw["model"], kw["optimizer"], kw["lr_scheduler"], state, ctx.snapshots.spare)
            ctx.snapshots.take(step, payload, write_payload, eval_pending=self.eval_step == step,
                               data_position=step * t.prompts_per_step)
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if not any(name in logs for name in gate):
                return  # the end-of-training summary (ours: training_stats.json) or an eval_* log
            metrics = {ours: logs[theirs] for theirs, ours in metric_names.items() if theirs in logs}
            metrics.update(extra_metrics(logs))
            tokens = float(logs.get("num_tokens", self.last_tokens))
            ctx.monitor.log(state.global_step, metrics, tokens=tokens - self.last_tokens)  # writes on rank 0
            self.last_tokens = tokens
            if self.eval_step == state.global_step:
                self.eval_step = None
                evaluate(state.global_step, control)  # rank 0 evaluates, the others wait
                ctx.snapshots.mark(eval_pending=False)

        def on_save(self, args, state, control, **kw):
            step = state.global_step
            digests = dist.rank_digests([p for p in ctx.policy.parameters() if p.requires_grad])
            dist.barrier()  # every rank has written its part (rng_state_<rank>.pth)
            if dist.is_main():
                staged = staging / f"checkpoint-{step}"
                info = {"data_position": step * t.prompts_per_step, "rank_weight_digests": digests, **ctx.extra_state}
                final = commit_checkpoint(ctx.paths.checkpoints, staged, step, info, t.keep_last, keep())
                after_commit()
                log.info("checkpoint %s", final)
            dist.barrier()

    return BridgeCallback()


def train_or_load_last(trainer, ctx: TrainContext) -> None:
    """`trainer.train()`, resuming from ctx.resume_from; but a run resumed at its last step
    (a signal or crash right after the last step's checkpoint, before the final
    evaluation) trains nothing: the HF Trainer checks max_steps only after a step, so it
    would train one step past the end. It only loads that checkpoint's weights."""
    resume = str(ctx.resume_from) if ctx.resume_from else None
    if resume and ctx.start_step >= trainer.args.max_steps > 0:
        trainer._load_from_checkpoint(resume)
        trainer.state.global_step = ctx.start_step
        return
    trainer.train(resume_from_checkpoint=resume)
