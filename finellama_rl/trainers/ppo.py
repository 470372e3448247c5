"""PPO with rule-based rewards on ONE shared (4-bit) base: our own loop, no TRL.

Why: TRL 1.16 has no PPO (removed in 1.13, and it needed a reward model). The
seed run trained Qwen2.5-3B with PPO (4-bit base, LoRA) and logged reward, loss,
policy loss and value loss with loss = policy loss + 0.5 x value loss; this is
that algorithm, behind the same `train(ctx) -> TrainOutcome` interface as GRPO.

    python -m finellama_rl.train trainer=ppo model=qwen2.5-3b hardware=a100_80
    python -m finellama_rl.train experiment=smoke trainer=ppo trainer.num_generations=1 trainer.prompts_per_step=8

One global step (the unit of max_steps, save_every, log_every and metrics) =
one rollout of trainer.prompts_per_step prompts (one completion each) + ppo.epochs
passes over it, each pass shuffled into ppo.num_mini_batches optimizer steps that
accumulate micro batches of trainer.micro_batch sequences. The scheduler counts
optimizer steps (max_steps * epochs * num_mini_batches).

Memory: the policy (LoRA "default"), the critic (a head on the same hidden
states, or a LoRA "value") and the reference (the same base under
`disable_adapter()`) share one base; nothing is copied unless LoRA is off and
trainer.beta > 0 (then a frozen copy is the reference; with beta == 0 there is
none and train/kl reads 0). Sampling uses trainer.temperature/top_p with top_k
and repetition penalty off, and log-probs use logits / temperature, so the old
log-probs describe the sampler (top_p truncation aside). Dropout is set to 0 so
that the first update's ratio is 1 (up to float rounding: its micro batches are
padded differently from the rollout's).

Metrics: train/kl is the per-token mean of the k1 estimator log pi - log pi_ref
over completion tokens of the rollout (comparable to GRPO's per-token kl);
train/kl_seq is the mean per-sequence sum. Loss terms are means over micro
batches (each a token mean), so train/loss = train/policy_loss + vf_coef *
train/value_loss exactly.

Checkpoints use HF Trainer file names plus value_head.safetensors; resume at step
k restores adapter(s), value head, optimizer, scheduler and RNG and continues with
step k+1 on the prompts the uninterrupted run would have used.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.trainers.ppo_core import (
    entropy_from_logits, explained_variance, logprobs_from_logits, masked_mean, policy_loss, value_loss,
)
from finellama_rl.trainers.ppo_rollout import Rollout, collect_rollout, rows_for_step
from finellama_rl.trainers.value_head import (
    POLICY_ADAPTER, Critic, disable_dropout, forward_completion, is_peft, model_device,
)
from finellama_rl.checkpoint import commit_checkpoint, staging_root
from finellama_rl.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass
class PPOState:
    policy: Any
    critic: Critic
    reference: Any  # None: the policy under disable_adapter() (or no KL when LoRA is off and beta == 0)
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_state(policy, t: TrainerConfig) -> PPOState:
    """Critic, reference, AdamW over LoRA + value head, and the LR schedule."""
    from transformers import get_scheduler

    critic = Critic(policy, t)  # may add the value adapter: before disable_dropout, which must see it
    disable_dropout(policy)
    policy.train()
    reference = None
    if not is_peft(policy) and t.beta > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
    params = critic.trainable_parameters(policy)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    total = t.max_steps * t.ppo.epochs * t.ppo.num_mini_batches
    scheduler = get_scheduler(t.lr_schedule.value, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)
    return PPOState(policy, critic, reference, params, optimizer, scheduler)


# ----------------------------------------------------------------------- update


def micro_step(state: PPOState, batch: Dict[str, torch.Tensor], t: TrainerConfig, scale: float) -> Dict[str, float]:
    """Forward + backward of one micro batch (gradients scaled by `scale`); detached stats."""
    mask = batch["mask"]                                                            # (b, T)
    logits, hidden = forward_completion(state.policy, batch, t.temperature)         # (b, T, V), (b, T, H)
    logprobs = logprobs_from_logits(logits, batch["completion"])                    # (b, T)
    pl, clip_frac, approx_kl = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, t.clip_epsilon)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits), mask)
    del logits, logprobs
    if state.critic.separate:  # the value adapter shares no trainable weight: backprop each loss alone
        (pl * scale).backward()
        hidden = None
    values = state.critic.values(state.policy, batch, hidden)                       # (b, T) fp32
    vl, v_clip = value_loss(values, batch["values"], batch["returns"], mask, t.ppo.clip_range_value)
    total = t.ppo.vf_coef * vl if state.critic.separate else pl + t.ppo.vf_coef * vl
    (total * scale).backward()
    return {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy": entropy.item(),
            "clip_frac": clip_frac.item(), "approx_kl": approx_kl.item(), "value_clip_frac": v_clip.item()}


def optimizer_step(state: PPOState, roll: Rollout, rows: torch.Tensor, t: TrainerConfig) -> List[Dict[str, float]]:
    """One mini-batch: accumulate its micro batches, clip, step. Returns per-micro stats."""
    micro = rows.split(t.micro_batch)
    stats = [micro_step(state, roll.batch(m), t, 1.0 / len(micro)) for m in micro]
    max_norm = t.max_grad_norm or float("inf")  # 0 = no clipping, but still measure the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, max_norm)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    for s in stats:
        s.update(grad_norm=float(grad_norm), learning_rate=lr)
    return stats


def ppo_update(state: PPOState, roll: Rollout, t: TrainerConfig) -> Dict[str, float]:
    """ppo.epochs shuffled passes of ppo.num_mini_batches optimizer steps; mean stats."""
    B = roll.completion.shape[0]
    stats: List[Dict[str, float]] = []
    for _ in range(t.ppo.epochs):
        perm = torch.randperm(B).to(roll.completion.device)  # global torch RNG: restored on resume
        for rows in perm.chunk(t.ppo.num_mini_batches):
            stats += optimizer_step(state, roll, rows, t)
    return {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}


def step_metrics(roll: Rollout, stats: Dict[str, float], t: TrainerConfig) -> Dict[str, float]:
    """The metrics of one step, with the keys the monitor and training_stats.json expect."""
    mask, kl, scores = roll.mask, roll["kl"], roll.scores
    m = {
        "train/reward_mean": scores.mean().item(),
        "train/reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "train/loss": stats["policy_loss"] + t.ppo.vf_coef * stats["value_loss"],
        "train/kl": masked_mean(kl, mask).item(),
        "train/kl_seq": (kl * mask).sum(-1).mean().item(),
        "train/value_explained_var": explained_variance(roll["values"], roll["returns"], mask),
        "train/completion_len": mask.sum(-1).mean().item(),
    }
    m.update({f"train/{k}": v for k, v in stats.items()})
    m.update({f"train/reward/{name}": float(np.mean(vals)) for name, vals in roll.reward_parts.items()})
    return m


def run_step(ctx: TrainContext, state: PPOState, step: int):
    """Rollout + update for global step `step`; returns (metrics, tokens processed)."""
    t = ctx.cfg.trainer
    rows = rows_for_step(ctx.train_rows, step, t.prompts_per_step, t.seed)
    roll = collect_rollout(state.policy, ctx.tokenizer, state.critic, state.reference, rows, ctx.reward_funcs, t)
    stats = ppo_update(state, roll, t)
    return step_metrics(roll, stats, t), roll.prompt_tokens + roll.mask.sum().item()


# ------------------------------------------------------------------ checkpoints


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])


def save_checkpoint(ctx: TrainContext, state: PPOState, step: int) -> Path:
    """Write everything resume needs into staging, then commit it as step_NNNNNN."""
    from safetensors.torch import save_file

    staged = staging_root(ctx.paths.checkpoints) / f"checkpoint-{step}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    state.policy.save_pretrained(staged)  # adapter_model.safetensors (+ value/ for the value adapter)
    head = {k: v.detach().cpu().contiguous() for k, v in state.critic.head.state_dict().items()}
    save_file(head, str(staged / "value_head.safetensors"))
    torch.save(state.optimizer.state_dict(), staged / "optimizer.pt")
    torch.save(state.scheduler.state_dict(), staged / "scheduler.pt")
    torch.save(rng_state(), staged / "rng_state.pth")
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    info = {"data_position": step * ctx.cfg.trainer.prompts_per_step, **ctx.extra_state}
    final = commit_checkpoint(ctx.paths.checkpoints, staged, step, info, ctx.cfg.trainer.keep_last)
    log.info("checkpoint %s", final)
    return final


def load_policy_weights(policy, ckpt: Path) -> None:
    """Adapter(s) into the existing PeftModel, or the full weights when LoRA is off."""
    from safetensors.torch import load_file

    device = str(model_device(policy))
    if not is_peft(policy):
        sd = {k: v for f in sorted(ckpt.glob("model*.safetensors")) for k, v in load_file(str(f), device=device).items()}
        result = policy.load_state_dict(sd, strict=False)
        if result.unexpected_keys or not sd:
            raise RuntimeError(f"{ckpt}: model weights do not match the policy ({result.unexpected_keys[:3]})")
        return
    from peft import set_peft_model_state_dict

    for name in policy.peft_config:
        folder = ckpt if name == POLICY_ADAPTER else ckpt / name
        result = set_peft_model_state_dict(policy, load_file(str(folder / "adapter_model.safetensors"), device=device), adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: adapter {name!r} does not match the policy ({result.unexpected_keys[:3]})")


def restore_checkpoint(ctx: TrainContext, state: PPOState) -> int:
    """Load a committed checkpoint into the live state; returns its step."""
    from safetensors.torch import load_file

    ckpt = Path(ctx.resume_from)
    step = int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])
    if step != ctx.start_step:
        log.warning("checkpoint %s says step %d but the run folder says %d; using %d", ckpt, step, ctx.start_step, step)
    load_policy_weights(state.policy, ckpt)
    state.critic.head.load_state_dict(load_file(str(ckpt / "value_head.safetensors"), device=str(model_device(state.policy))))
    state.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    state.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(ckpt / "rng_state.pth", weights_only=False))  # our own file (numpy state)
    log.info("resumed from step %d (%s)", step, ckpt)
    return step


# ------------------------------------------------------------------------- loop


def _mean_metrics(records: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in records[-1]}


def train(ctx: TrainContext) -> TrainOutcome:
    t = ctx.cfg.trainer
    if not ctx.train_rows:
        raise ValueError("no training prompts: every prompt is longer than trainer.max_prompt_tokens?")
    state = build_state(ctx.policy, t)
    start = restore_checkpoint(ctx, state) if ctx.resume_from else 0
    pending: List[Dict[str, float]] = []
    tokens = 0.0
    for step in range(start + 1, t.max_steps + 1):
        metrics, n_tokens = run_step(ctx, state, step)
        pending.append(metrics)
        tokens += n_tokens
        decision = ctx.monitor.decide(step)
        if step % t.log_every == 0 or step == t.max_steps or decision.stop:
            ctx.monitor.log(step, _mean_metrics(pending), tokens=tokens)  # averaged since the last log
            pending, tokens = [], 0.0
        if decision.save:
            save_checkpoint(ctx, state, step)
        if decision.evaluate:
            ctx.evaluate(state.policy, step)
        if decision.stop:
            return TrainOutcome(final_step=step, stopped_early=True, stop_reason=decision.reason)
    return TrainOutcome(final_step=max(start, t.max_steps), stopped_early=False)
