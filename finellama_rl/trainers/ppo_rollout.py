"""PPO's experience collection: which prompts a step uses, sampling one completion
per prompt, rewards, and the no-grad scoring passes that turn samples into
advantages (old log-probs, values, reference log-probs, KL-shaped rewards, GAE).

Why a module of its own: ppo.py keeps the loop, the update and checkpoints; this
file is everything that happens under no_grad. Used by finellama_rl/trainers/ppo.py.

Layout of a rollout (B = prompts_per_step sequences):
    input_ids / attention_mask  (B, L)  prompt left-padded to Lp, then T completion tokens
    completion / mask           (B, T)  sampled ids; 1 on tokens up to and incl. the first EOS
    old_logprobs, values, ref_logprobs, kl, advantages, returns  (B, T) fp32
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from finellama_rl.trainers.ppo_core import (
    build_token_rewards, compute_gae, kl_per_token, logprobs_from_logits, masked_whiten,
)
from finellama_rl.trainers.value_head import Critic, forward_completion, is_peft, model_device
from finellama_rl.config import TrainerConfig

TOKEN_KEYS = ("completion", "mask", "old_logprobs", "values", "ref_logprobs", "kl", "advantages", "returns")


def rows_for_step(rows: Sequence[dict], step: int, prompts_per_step: int, seed: int) -> List[dict]:
    """The prompts of global step `step` (1-based): positions [(step-1)P, step P) of the
    concatenation of per-epoch permutations (epoch e shuffled with seed + e)."""
    n = len(rows)
    out, perms = [], {}
    for pos in range((step - 1) * prompts_per_step, step * prompts_per_step):
        epoch = pos // n
        if epoch not in perms:
            perm = list(range(n))
            random.Random(seed + epoch).shuffle(perm)
            perms[epoch] = perm
        out.append(rows[perms[epoch][pos % n]])
    return out


def completion_mask(completion: Tensor, eos_id: int) -> Tensor:
    """1 on tokens up to and including the first EOS, 0 after: (B, T) long."""
    is_eos = (completion == eos_id).long()                    # (B, T)
    eos_before = is_eos.cumsum(-1) - is_eos                   # EOS strictly before t
    return (eos_before == 0).long()


@dataclass
class Rollout:
    input_ids: Tensor           # (B, L)
    attention_mask: Tensor      # (B, L)
    completion: Tensor          # (B, T)
    mask: Tensor                # (B, T) float
    scores: Tensor              # (B,) weighted reward
    reward_parts: Dict[str, List[float]]
    texts: List[str]
    prompt_tokens: int
    extra: Dict[str, Tensor] = field(default_factory=dict)  # the other TOKEN_KEYS, (B, T)

    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, key) if key in ("completion", "mask") else self.extra[key]

    def batch(self, rows: Tensor) -> Dict[str, Tensor]:
        """Rows `rows` as a dict, trimmed of all-padding columns on both ends."""
        attn = self.attention_mask[rows]                                    # (b, L)
        mask = self.mask[rows]                                              # (b, T)
        Lp = self.input_ids.shape[1] - self.completion.shape[1]
        first = int(attn[:, :Lp].any(0).nonzero().min()) if Lp else 0      # leading pad columns
        t_keep = max(1, int(mask.sum(-1).max()))                            # trailing pad columns
        out = {"input_ids": self.input_ids[rows, first:Lp + t_keep], "attention_mask": attn[:, first:Lp + t_keep]}
        for key in TOKEN_KEYS:
            if key in ("completion", "mask") or key in self.extra:
                out[key] = self[key][rows, :t_keep]
        return out


def _sample(policy, tokenizer, prompts: List[str], t: TrainerConfig):
    """Left-padded prompts (B, Lp) and sampled completions (B, T) right-padded with pad ids."""
    device = model_device(policy)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    pieces = []
    for i in range(0, len(prompts), t.micro_batch):
        ids, attn = enc["input_ids"][i:i + t.micro_batch], enc["attention_mask"][i:i + t.micro_batch]
        # top_k=0 / repetition_penalty=1: sample from the policy itself (the model's
        # generation_config may say otherwise), so old log-probs describe the sampler
        out = policy.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=t.temperature, top_p=t.top_p,
            top_k=0, repetition_penalty=1.0, max_new_tokens=t.max_completion_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
        )
        pieces.append(out[:, ids.shape[1]:])                   # (b, t_i)
    T = max(p.shape[1] for p in pieces)
    completion = torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1]), value=tokenizer.pad_token_id) for p in pieces])
    return enc["input_ids"], enc["attention_mask"], completion


def compute_rewards(reward_funcs: Sequence[Callable], names: Sequence[str], weights: Optional[Sequence[float]],
                    texts: List[str], rows: List[dict]):
    """Weighted sum of the reward functions: ((B,) tensor, {name: per-sample list})."""
    cols = {k: [r[k] for r in rows] for k in ("answer", "question", "prompt")}
    total = torch.zeros(len(texts), dtype=torch.float32)
    parts = {}
    for i, f in enumerate(reward_funcs):
        vals = [float(v) for v in f(completions=texts, **cols)]
        parts[names[i] if i < len(names) else getattr(f, "__name__", str(i))] = vals
        total += (weights[i] if weights else 1.0) * torch.tensor(vals, dtype=torch.float32)
    return total, parts


def generate_rollout(policy, tokenizer, rows: List[dict], reward_funcs, t: TrainerConfig) -> Rollout:
    """Sample one completion per prompt (eval mode, no grad) and score it."""
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            prompt_ids, prompt_attn, completion = _sample(policy, tokenizer, [r["prompt"] for r in rows], t)
    finally:
        policy.train(was_training)
    mask = completion_mask(completion, tokenizer.eos_token_id)          # (B, T)
    texts = tokenizer.batch_decode([c[: int(m.sum())] for c, m in zip(completion, mask)], skip_special_tokens=True)
    scores, parts = compute_rewards(reward_funcs, t.rewards, t.reward_weights, texts, rows)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], 1),              # (B, Lp + T)
        attention_mask=torch.cat([prompt_attn, mask], 1),
        completion=completion, mask=mask.float(), scores=scores.to(completion.device),
        reward_parts=parts, texts=texts, prompt_tokens=int(prompt_attn.sum()),
    )


def reference_logprobs(policy, reference, batch: Dict[str, Tensor], temperature: float) -> Tensor:
    """log pi_ref of the completion (B, T): the base with adapters disabled, or a frozen copy."""
    if reference is not None:
        logits, _ = forward_completion(reference, batch, temperature)
    else:
        with policy.disable_adapter():
            logits, _ = forward_completion(policy, batch, temperature)
    return logprobs_from_logits(logits, batch["completion"])


@torch.no_grad()
def score_rollout(policy, critic: Critic, reference, roll: Rollout, t: TrainerConfig) -> None:
    """Fill old_logprobs, values and ref_logprobs (micro batch at a time, eval mode)."""
    B, T = roll.completion.shape
    for key in ("old_logprobs", "values", "ref_logprobs"):
        roll.extra[key] = torch.zeros(B, T, dtype=torch.float32, device=roll.completion.device)
    has_ref = reference is not None or is_peft(policy)
    was_training = policy.training
    policy.eval()
    try:
        for rows in torch.arange(B, device=roll.completion.device).split(t.micro_batch):
            batch = roll.batch(rows)                                          # trimmed: (b, L'), (b, T')
            T_b = batch["completion"].shape[1]
            logits, hidden = forward_completion(policy, batch, t.temperature)  # (b, T', V), (b, T', H)
            old = logprobs_from_logits(logits, batch["completion"])
            del logits
            ref = reference_logprobs(policy, reference, batch, t.temperature) if has_ref else old
            roll.extra["old_logprobs"][rows, :T_b] = old
            roll.extra["values"][rows, :T_b] = critic.values(policy, batch, hidden)
            roll.extra["ref_logprobs"][rows, :T_b] = ref
    finally:
        policy.train(was_training)


def compute_advantages(roll: Rollout, t: TrainerConfig) -> None:
    """KL-shaped token rewards -> GAE advantages (whitened if asked) and returns, all (B, T)."""
    mask = roll.mask
    kl = kl_per_token(roll["old_logprobs"], roll["ref_logprobs"]) * mask            # (B, T)
    token_rewards = build_token_rewards(roll.scores, kl, mask, t.beta)               # (B, T)
    advantages, returns = compute_gae(token_rewards, roll["values"], mask, t.ppo.gamma, t.ppo.lam)
    if t.ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    roll.extra.update(kl=kl, advantages=advantages, returns=returns)


def collect_rollout(policy, tokenizer, critic: Critic, reference, rows: List[dict], reward_funcs, t: TrainerConfig) -> Rollout:
    roll = generate_rollout(policy, tokenizer, rows, reward_funcs, t)
    score_rollout(policy, critic, reference, roll, t)
    compute_advantages(roll, t)
    return roll
