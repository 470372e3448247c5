"""PPO with rule-based rewards on ONE shared (4-bit) base: our own loop, no TRL.

Why: TRL 1.16 has no PPO (removed in 1.13, and it needed a reward model). The
seed run trained Qwen2.5-3B with PPO (4-bit base, LoRA) and logged reward, loss,
policy loss and value loss with loss = policy loss + 0.5 x value loss; this is
that algorithm, behind the same `train(ctx) -> TrainOutcome` interface as GRPO.

    python -m finellama_rl.train trainer=ppo model=qwen2.5-3b hardware=a100_80
    python -m finellama_rl.train experiment=smoke trainer=ppo trainer.prompts_per_step=8

One global step (the unit of max_steps, save_every, log_every, warmup_steps and
metrics) = one rollout of trainer.prompts_per_step prompts (one completion each,
sampled in chunks of trainer.generation_batch) + ppo.epochs passes over it, each
pass shuffled into ppo.num_mini_batches optimizer steps that accumulate micro
batches of trainer.micro_batch sequences. The scheduler counts optimizer steps
(max_steps and warmup_steps x epochs x num_mini_batches).

The objective does not depend on micro_batch (so the OOM ladder's batch rungs keep
it): the policy and value terms of a mini-batch are summed over its tokens and
divided by the mini-batch's token count over all ranks, then the gradients are
summed over ranks. Micro batch 8, 4, 2 or 1 give the same gradient up to float
rounding (tests/test_ppo.py).

Memory: the policy (LoRA "default"), the critic (a head on the same hidden
states, or a LoRA "value") and the reference (the same base under
`disable_adapter()`) share one base; nothing is copied unless LoRA is off and
ppo.kl_coef > 0 (then a frozen copy is the reference). With ppo.kl_coef = 0 the
reference pass is skipped (the KL reward term would be 0 x KL) and train/kl* are not
logged, as TRL's GRPO logs no KL with beta = 0. Trainable weights and AdamW
state are fp32; forwards run under bf16 autocast on GPUs with bf16. Sampling passes
every decoding setting explicitly (trainers/decoding.py) and log-probs use logits /
temperature, so the old log-probs describe the sampler (top_p must be 1); it is keyed
per sequence (job/sampling.py), so a generation-phase OOM step-down or another number of
ranks samples the same rollout. LoRA dropout must be 0 so that the first update's ratio
is 1. trainer.advantage_scaling: batch whitens the GAE advantages over the step's loss
tokens on all ranks, none keeps them raw; trainer.truncation (none | mask | penalty)
treats completions cut at max_completion_tokens as GRPO does (ppo_rollout.py).

Metrics: train/kl is the per-token mean of the k3 estimator exp(d) - d - 1 (d = log
pi_ref - log pi) over completion tokens of the rollout, the same estimator TRL's
GRPO logs; train/kl_k1 the mean of k1 = log pi - log pi_ref (what ppo.kl_coef
shapes the rewards with), train/kl_seq its per-sequence sum; train/completion_len the
mean tokens up to EOS and train/frac_truncated the share cut at the cap. Loss terms are token
means of each mini-batch, averaged over the step's optimizer steps, so train/loss =
train/policy_loss + vf_coef * train/value_loss exactly.

Checkpoints use HF Trainer file names for the adapter plus value_head.safetensors,
optimizer.pt (read with weights_only=True), scheduler.json and rng_state.safetensors
(no pickle); resume at step k restores adapter(s), value head, optimizer, scheduler
and RNG and continues with step k+1 on the prompts the uninterrupted run would have
used. After every step the same state is kept in host memory (ctx.snapshots).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from finellama_rl.job import distributed as dist
from finellama_rl.checkpoint import commit_checkpoint, read_state, staging_root
from finellama_rl.config import Device, HardwareConfig, TrainerConfig, Truncation
from finellama_rl.ladder.rungs import Phase
from finellama_rl.trainers.base import TrainContext, TrainOutcome
from finellama_rl.trainers.ppo_core import entropy_from_logits, explained_variance, logprobs_from_logits
from finellama_rl.trainers.ppo_core import policy_loss_terms, value_loss_terms
from finellama_rl.trainers.ppo_rollout import Rollout, RolloutEnv, collect_rollout, rows_for_step, shard
from finellama_rl.job.snapshot import (
    RNG_FILE, SCHEDULER_FILE, adapter_state, host_copy, load_optimizer, load_rng, load_scheduler, rng_state, save_rng,
    save_scheduler, set_rng_state,
)
from finellama_rl.trainers.value_head import POLICY_ADAPTER, Critic, disable_dropout, forward_completion, is_peft, model_device

log = logging.getLogger(__name__)

STAT_KEYS = ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "value_clip_frac")


@dataclass
class PPOState:
    policy: Any
    critic: Critic
    reference: Any  # None: the policy under disable_adapter() (or no KL when LoRA is off and kl_coef == 0)
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: bool = False  # bf16 autocast for forwards (CUDA with bf16)


def keep_fp32(params: List[torch.nn.Parameter]) -> None:
    """Trainable weights in fp32 (PEFT's default; checked, so a bf16 base never leaks in)."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def build_state(policy, t: TrainerConfig, hardware: HardwareConfig = None) -> PPOState:
    """Critic, reference, AdamW over LoRA + value head (fp32), and the LR schedule in
    optimizer steps (warmup_steps counts global steps, like GRPO's)."""
    from transformers import get_scheduler

    critic = Critic(policy, t)  # may add the value adapter: before disable_dropout, which must see it
    disable_dropout(policy)
    policy.train()
    reference = None
    if not is_peft(policy) and t.ppo.kl_coef > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
    params = critic.trainable_parameters(policy)
    keep_fp32(params)
    dist.broadcast_(params)  # identical starting weights on every rank
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    per_step = t.ppo.epochs * t.ppo.num_mini_batches
    scheduler = get_scheduler(t.lr_schedule.value, optimizer, num_warmup_steps=t.warmup_steps * per_step,
                              num_training_steps=t.max_steps * per_step)
    amp = bool(hardware and hardware.bf16 and hardware.device == Device.cuda)
    return PPOState(policy, critic, reference, params, optimizer, scheduler, amp)


# ----------------------------------------------------------------------- update


def micro_step(state: PPOState, batch: Dict[str, torch.Tensor], t: TrainerConfig, n_tokens: float,
               env: RolloutEnv) -> Dict[str, float]:
    """Forward + backward of one micro batch; its loss terms are summed over tokens and
    divided by the mini-batch's token count `n_tokens`. Returns detached token sums."""
    mask = batch["mask"]                                                            # (b, T)
    with env.autocast():
        logits, hidden = forward_completion(state.policy, batch, t.temperature)     # (b, T, V), (b, T, H)
    logprobs = logprobs_from_logits(logits, batch["completion"])                    # (b, T)
    pl_tok, clipped, approx_kl = policy_loss_terms(logprobs, batch["old_logprobs"], batch["advantages"], t.clip_epsilon)
    pl_sum = (pl_tok * mask).sum()
    with torch.no_grad():
        entropy = (entropy_from_logits(logits) * mask).sum()
    del logits, logprobs
    if state.critic.separate:  # the value adapter shares no trainable weight: backprop each loss alone
        (pl_sum / n_tokens).backward()
        hidden = None
    with env.autocast():
        values = state.critic.values(state.policy, batch, hidden)                   # (b, T) fp32
    vl_tok, v_clipped = value_loss_terms(values, batch["values"], batch["returns"], t.ppo.clip_range_value)
    vl_sum = (vl_tok * mask).sum()
    total = t.ppo.vf_coef * vl_sum if state.critic.separate else pl_sum + t.ppo.vf_coef * vl_sum
    (total / n_tokens).backward()
    sums = (pl_sum, vl_sum, entropy, (clipped * mask).sum(), (approx_kl * mask).sum(), (v_clipped * mask).sum())
    return {k: float(v.detach()) for k, v in zip(STAT_KEYS, sums)}


def accumulate_gradients(state: PPOState, roll: Rollout, rows: torch.Tensor, t: TrainerConfig,
                         env: RolloutEnv = None) -> Dict[str, float]:
    """Gradients of one mini-batch (this rank's `rows`) summed over micro batches and ranks.
    Returns its token means (over all ranks) of the loss terms and statistics."""
    env = env or RolloutEnv()
    n_tokens = float(dist.all_reduce_sum(roll.mask[rows].sum().reshape(1))[0].clamp(min=1.0))
    sums = dict.fromkeys(STAT_KEYS, 0.0)
    for micro in rows.split(t.micro_batch):
        with env.phase(Phase.training):
            for k, v in micro_step(state, roll.batch(micro), t, n_tokens, env).items():
                sums[k] += v
    dist.all_reduce_grads(state.params)
    totals = dist.all_reduce_sum(torch.tensor([sums[k] for k in STAT_KEYS], dtype=torch.float64))
    return {k: float(v) / n_tokens for k, v in zip(STAT_KEYS, totals)}


def optimizer_step(state: PPOState, roll: Rollout, rows: torch.Tensor, t: TrainerConfig,
                   env: RolloutEnv = None) -> Dict[str, float]:
    """One mini-batch: accumulate, clip, step. Returns its statistics."""
    env = env or RolloutEnv()
    stats = accumulate_gradients(state, roll, rows, t, env)
    with env.phase(Phase.optimizer):
        max_norm = t.max_grad_norm or float("inf")  # 0 = no clipping, but still measure the norm
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, max_norm)
        lr = state.scheduler.get_last_lr()[0]
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": float(grad_norm), "learning_rate": lr}


def ppo_update(state: PPOState, roll: Rollout, t: TrainerConfig, env: RolloutEnv = None) -> Dict[str, float]:
    """ppo.epochs shuffled passes of ppo.num_mini_batches optimizer steps; mean stats."""
    B = roll.completion.shape[0]
    stats: List[Dict[str, float]] = []
    for _ in range(t.ppo.epochs):
        perm = torch.randperm(B).to(roll.completion.device)  # global torch RNG: restored on resume
        for rows in perm.chunk(t.ppo.num_mini_batches):
            stats.append(optimizer_step(state, roll, rows, t, env))
    return {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}


def _global_token_means(roll: Rollout) -> Dict[str, float]:
    """Rollout statistics over every rank: rewards, KL estimators (over loss tokens),
    completion lengths (up to EOS, whatever trainer.truncation masks), truncated fraction."""
    mask, scores = roll.mask, roll.scores.float()
    lengths = roll.lengths.float() if roll.lengths is not None else mask.sum(-1)
    truncated = roll.truncated.float() if roll.truncated is not None else torch.zeros_like(lengths)
    local = torch.stack([scores.sum(), (scores ** 2).sum(), torch.tensor(float(scores.numel())),
                         (roll["kl_k3"] * mask).sum(), (roll["kl"] * mask).sum(), mask.sum(),
                         lengths.sum().cpu(), truncated.sum().cpu()]).double()
    s, s2, n, k3, k1, tokens, length, cut = dist.all_reduce_sum(local.to(mask.device)).tolist()
    var = max(0.0, (s2 - s * s / n) / (n - 1)) if n > 1 else 0.0
    out = {"train/reward_mean": s / n, "train/reward_std": var ** 0.5, "train/completion_len": length / n,
           "train/frac_truncated": cut / n}
    if roll.has_reference:  # none with ppo.kl_coef == 0 (ppo_rollout.has_reference): no KL to report
        out.update({"train/kl": k3 / max(tokens, 1.0), "train/kl_k1": k1 / max(tokens, 1.0), "train/kl_seq": k1 / n})
    return out


def step_metrics(roll: Rollout, stats: Dict[str, float], t: TrainerConfig) -> Dict[str, float]:
    """The metrics of one step, with the keys the monitor and training_stats.json expect."""
    m = _global_token_means(roll)
    m["train/loss"] = stats["policy_loss"] + t.ppo.vf_coef * stats["value_loss"]
    m["train/value_explained_var"] = explained_variance(roll["values"], roll["returns"], roll.mask)  # this rank's
    m.update({f"train/{k}": v for k, v in stats.items()})
    m.update({f"train/reward/{name}": float(np.mean(vals)) for name, vals in roll.reward_parts.items()})
    return m


def run_step(ctx: TrainContext, state: PPOState, step: int) -> Tuple[Dict[str, float], float]:
    """Rollout + update for global step `step`; returns (metrics, tokens processed on all ranks)."""
    t = ctx.cfg.trainer
    env = RolloutEnv(step=step, tracker=ctx.tracker, amp=state.amp, eos_logit_bias=ctx.cfg.debug.eos_logit_bias)
    rows = shard(rows_for_step(ctx.train_rows, step, t.prompts_per_step, t.seed))
    roll = collect_rollout(state.policy, ctx.tokenizer, state.critic, state.reference, rows, ctx.reward_funcs, t, env)
    stats = ppo_update(state, roll, t, env)
    metrics = step_metrics(roll, stats, t)
    if metrics["train/frac_truncated"] == 1.0 and t.truncation == Truncation.mask:
        log.warning("step %d: every completion reached max_completion_tokens=%d and trainer.truncation=mask: "
                    "the step trained on nothing", step, t.max_completion_tokens)
    local = torch.tensor([float(roll.prompt_tokens + roll.lengths.sum().item())], dtype=torch.float64)
    return metrics, float(dist.all_reduce_sum(local.to(roll.mask.device))[0])


# ------------------------------------------------------------------ checkpoints


def capture(state: PPOState, step: int, reuse: dict[str, Any] | None = None) -> Dict[str, Any]:
    """Everything a checkpoint holds, copied to host memory (no model references). `reuse`:
    a payload nobody reads any more (SnapshotHolder.spare), whose tensors are overwritten."""
    policy, reuse = state.policy, reuse or {}
    old = reuse.get("adapters") or {}
    if is_peft(policy):
        adapters = {name: adapter_state(policy, name, reuse=old.get(name)) for name in policy.peft_config}
        configs = {name: copy.deepcopy(cfg) for name, cfg in policy.peft_config.items()}
    else:
        adapters, configs = {"": host_copy(policy.state_dict(), old.get(""))}, {}
    return {"adapters": adapters, "adapter_configs": configs,
            "value_head": host_copy(state.critic.head.state_dict(), reuse.get("value_head")),
            "optimizer": host_copy(state.optimizer.state_dict(), reuse.get("optimizer")),
            "scheduler": copy.deepcopy(state.scheduler.state_dict()),
            "rng": rng_state(), "step": step}  # rng_state() is already a fresh host copy


def write_payload(folder: Path, payload: Dict[str, Any]) -> None:
    """A captured state as a checkpoint folder (safe formats; optimizer.pt is tensors only)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for name, sd in payload["adapters"].items():
        if not name:  # full fine-tuning: the whole model
            save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
            continue
        sub = folder if name == POLICY_ADAPTER else folder / name
        sub.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(sub / "adapter_model.safetensors"))
        payload["adapter_configs"][name].save_pretrained(str(sub))
    save_file({k: v.contiguous() for k, v in payload["value_head"].items()}, str(folder / "value_head.safetensors"))
    torch.save(payload["optimizer"], folder / "optimizer.pt")
    save_scheduler(folder / SCHEDULER_FILE, payload["scheduler"])
    save_rng(folder / RNG_FILE, payload["rng"])
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": payload["step"]}))


def save_checkpoint(ctx: TrainContext, state: PPOState, step: int, payload: Dict[str, Any] = None) -> Path:
    """Rank 0 writes everything resume needs into staging and commits it as step_NNNNNN."""
    staged = staging_root(ctx.paths.checkpoints) / f"checkpoint-{step}"
    final = None
    digests = dist.rank_digests(state.params)  # every rank: the data-parallel replicas must agree
    if dist.is_main():
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        write_payload(staged, payload or capture(state, step))
        info = {"data_position": step * ctx.cfg.trainer.prompts_per_step, "rank_weight_digests": digests, **ctx.extra_state}
        final = commit_checkpoint(ctx.paths.checkpoints, staged, step, info, ctx.cfg.trainer.keep_last)
        log.info("checkpoint %s", final)
    dist.barrier()
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
    """Load a committed checkpoint (or OOM snapshot) into the live state; returns its step.
    Nothing is unpickled but optimizer.pt, through torch's weights_only loader."""
    from safetensors.torch import load_file

    ckpt = Path(ctx.resume_from)
    step = int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])
    if step != ctx.start_step:
        log.warning("checkpoint %s says step %d but the run folder says %d; using %d", ckpt, step, ctx.start_step, step)
    load_policy_weights(state.policy, ckpt)
    state.critic.head.load_state_dict(load_file(str(ckpt / "value_head.safetensors"), device=str(model_device(state.policy))))
    state.optimizer.load_state_dict(load_optimizer(ckpt / "optimizer.pt"))
    state.scheduler.load_state_dict(load_scheduler(ckpt / SCHEDULER_FILE))
    set_rng_state(load_rng(ckpt / RNG_FILE))
    log.info("resumed from step %d (%s)", step, ckpt)
    return step


# ------------------------------------------------------------------------- loop


def _mean_metrics(records: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in records[-1]}


def train(ctx: TrainContext) -> TrainOutcome:
    t = ctx.cfg.trainer
    if not ctx.train_rows:
        raise ValueError("no training prompts: every prompt is longer than trainer.max_prompt_tokens?")
    state = build_state(ctx.policy, t, ctx.cfg.hardware)
    start, pending, tokens = 0, [], 0.0
    if ctx.resume_from:
        start = restore_checkpoint(ctx, state)
        saved = read_state(ctx.resume_from)
        pending, tokens = list(saved.get("pending_metrics", [])), float(saved.get("pending_tokens", 0.0))
    for step in range(start + 1, t.max_steps + 1):
        ctx.tracker.step = step
        metrics, n_tokens = run_step(ctx, state, step)
        pending.append(metrics)
        tokens += n_tokens
        decision = ctx.monitor.decide(step)
        if step % t.log_every == 0 or step == t.max_steps or decision.stop:
            ctx.monitor.log(step, _mean_metrics(pending), tokens=tokens)  # averaged since the last log
            pending, tokens = [], 0.0
        payload = capture(state, step, ctx.snapshots.spare)
        ctx.snapshots.take(step, payload, write_payload, data_position=step * t.prompts_per_step,
                           pending_metrics=list(pending), pending_tokens=tokens, eval_pending=decision.evaluate)
        if decision.save:
            save_checkpoint(ctx, state, step, payload)
        if decision.evaluate:
            ctx.evaluate(state.policy, step)
            ctx.snapshots.mark(eval_pending=False)
        if decision.stop:
            return TrainOutcome(final_step=step, stopped_early=True, stop_reason=decision.reason)
    return TrainOutcome(final_step=max(start, t.max_steps), stopped_early=False)
