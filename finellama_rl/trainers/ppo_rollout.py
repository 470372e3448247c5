"""PPO's experience collection: which prompts a step uses, sampling one completion
per prompt, rewards, and the no-grad scoring passes that turn samples into
advantages (old log-probs, values, reference log-probs, KL-shaped rewards, GAE).

Why a module of its own: ppo.py keeps the loop, the update and checkpoints; this
file is everything that happens under no_grad. Used by finellama_rl/trainers/ppo.py.

Sampling: the rollout is generated in as few generate calls as memory allows
(trainer.generation_batch sequences per call; 0 = all in one), with every decoding
setting passed explicitly (`sampling_kwargs`: a model's generation_config, e.g.
Qwen2.5's repetition_penalty 1.05 and top_k 20, never changes what is sampled).
Sampling is keyed (finellama_rl/job/sampling.py): a completion's draws depend on (seed,
step, its position in the step over all ranks, token position) only, so the rollout is
the same whatever the generate calls, the number of ranks or an out-of-memory step-down
of the generation batch, and sampling leaves the global RNG alone.

Truncation (trainer.truncation): a completion without EOS within max_completion_tokens
is truncated; `mask` keeps its reward in the statistics but takes its tokens out of the
loss mask (so out of the token counts, GAE whitening and the value loss); `penalty`
subtracts trainer.truncation_penalty from its score (reward part `truncation`).

Layout of a rollout (B = this rank's prompts of the step):
    input_ids / attention_mask  (B, L)  prompt left-padded to Lp, then T completion tokens
    completion                  (B, T)  sampled ids
    mask                        (B, T)  loss mask: 1 on tokens up to and incl. the first EOS
                                        (0 on truncated rows under truncation=mask)
    lengths, truncated          (B,)    tokens up to and incl. the first EOS; no EOS at all
    old_logprobs, values, ref_logprobs, kl, kl_k3, advantages, returns  (B, T) fp32
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from finellama_rl.job import distributed as dist
from finellama_rl.config import AdvantageScaling, TrainerConfig, Truncation
from finellama_rl.job.sampling import generate_keyed, row_keys
from finellama_rl.trainers.decoding import own_generation_config, sampling_kwargs
from finellama_rl.ladder.rungs import Phase
from finellama_rl.trainers.ppo_core import (
    build_token_rewards, compute_gae, kl_k3, kl_per_token, logprobs_from_logits,
)
from finellama_rl.trainers.value_head import Critic, forward_completion, is_peft, model_device

TOKEN_KEYS = ("completion", "mask", "old_logprobs", "values", "ref_logprobs", "kl", "advantages", "returns")


@dataclass
class RolloutEnv:
    """Where a rollout runs: its global step (sampling keys), the phase tracker (OOM
    attribution, fault injection), whether forwards run under bf16 autocast, and
    debug.eos_logit_bias (tests: uneven completion lengths from a tiny random model)."""

    step: int = 0
    tracker: Any = None  # finellama_rl.job.faults.PhaseTracker
    amp: bool = False
    eos_logit_bias: float = 0.0

    def phase(self, name: str):
        return self.tracker.phase(name) if self.tracker is not None else contextlib.nullcontext()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()


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


def shard(rows: List[dict]) -> List[dict]:
    """This rank's contiguous share of the step's prompts."""
    per = len(rows) // dist.world()
    return rows[dist.rank() * per:(dist.rank() + 1) * per]


def completion_mask(completion: Tensor, eos_id: int) -> Tensor:
    """1 on tokens up to and including the first EOS, 0 after: (B, T) long."""
    is_eos = (completion == eos_id).long()                    # (B, T)
    eos_before = is_eos.cumsum(-1) - is_eos                   # EOS strictly before t
    return (eos_before == 0).long()


def _left_pad(ids: Tensor, attn: Tensor, width: int, pad_id: int):
    extra = width - ids.shape[1]
    if not extra:
        return ids, attn
    return (torch.nn.functional.pad(ids, (extra, 0), value=pad_id), torch.nn.functional.pad(attn, (extra, 0), value=0))


def _sample(policy, tokenizer, prompts: List[str], t: TrainerConfig, env: RolloutEnv):
    """Left-padded prompts (B, Lp) and sampled completions (B, T) right-padded with pad ids,
    in chunks of trainer.generation_batch prompts (0 = one generate call). Row i of this
    rank is sequence rank * B + i of the step (`shard` is contiguous): its sampling key."""
    device = model_device(policy)
    size = t.generation_batch or len(prompts)
    kwargs = sampling_kwargs(t, tokenizer)
    first = dist.rank() * len(prompts)
    bias = {tokenizer.eos_token_id: env.eos_logit_bias} if env.eos_logit_bias else None
    pieces = []
    for i in range(0, len(prompts), size):
        chunk = prompts[i:i + size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        keys = row_keys(t.seed, env.step, range(first + i, first + i + len(chunk)))
        with env.autocast(), own_generation_config(policy):
            out = generate_keyed(policy, keys, bias, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 **kwargs)
        pieces.append((enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1]:]))  # (b, t_i)
    Lp = max(p[0].shape[1] for p in pieces)
    T = max(p[2].shape[1] for p in pieces)
    pad = tokenizer.pad_token_id
    ids, attn = zip(*(_left_pad(p[0], p[1], Lp, pad) for p in pieces))
    completion = torch.cat([torch.nn.functional.pad(p[2], (0, T - p[2].shape[1]), value=pad) for p in pieces])
    return torch.cat(ids), torch.cat(attn), completion


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
    has_reference: bool = True  # False: scored without a reference (ppo.kl_coef == 0), no KL to report
    lengths: Optional[Tensor] = None    # (B,) completion tokens up to and incl. the first EOS
    truncated: Optional[Tensor] = None  # (B,) bool: no EOS within max_completion_tokens

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


def generate_rollout(policy, tokenizer, rows: List[dict], reward_funcs, t: TrainerConfig,
                     env: Optional[RolloutEnv] = None) -> Rollout:
    """Sample one completion per prompt (eval mode, no grad) and score it."""
    env = env or RolloutEnv()
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad(), env.phase(Phase.generation):
            prompt_ids, prompt_attn, completion = _sample(policy, tokenizer, [r["prompt"] for r in rows], t, env)
    finally:
        policy.train(was_training)
    mask = completion_mask(completion, tokenizer.eos_token_id)          # (B, T)
    truncated = ~(completion == tokenizer.eos_token_id).any(-1)         # (B,) no EOS within the budget
    texts = tokenizer.batch_decode([c[: int(m.sum())] for c, m in zip(completion, mask)], skip_special_tokens=True)
    scores, parts = compute_rewards(reward_funcs, t.rewards, t.reward_weights, texts, rows)
    if t.truncation == Truncation.penalty:
        penalty = -t.truncation_penalty * truncated.float().cpu()
        scores, parts["truncation"] = scores + penalty, penalty.tolist()
    loss_mask = mask * (~truncated).unsqueeze(1) if t.truncation == Truncation.mask else mask
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], 1),              # (B, Lp + T)
        attention_mask=torch.cat([prompt_attn, mask], 1),
        completion=completion, mask=loss_mask.float(), scores=scores.to(completion.device),
        reward_parts=parts, texts=texts, prompt_tokens=int(prompt_attn.sum()),
        lengths=mask.sum(-1), truncated=truncated,
    )


def reference_logprobs(policy, reference, batch: Dict[str, Tensor], temperature: float) -> Tensor:
    """log pi_ref of the completion (B, T): the base with adapters disabled, or a frozen copy."""
    with _reference_model(policy, reference) as model:
        logits, _ = forward_completion(model, batch, temperature)
    return logprobs_from_logits(logits, batch["completion"])


def has_reference(policy, reference, t: TrainerConfig) -> bool:
    """Whether the rollout is scored under a reference. With ppo.kl_coef == 0 the KL term
    of the rewards is 0 x KL whatever the reference says, so its forward pass (a third of
    a step's forwards) is skipped and the KL metrics are not logged (as TRL's GRPO logs no
    KL with beta = 0): the update is the same."""
    return t.ppo.kl_coef != 0 and (reference is not None or is_peft(policy))


@torch.no_grad()
def score_rollout(policy, critic: Critic, reference, roll: Rollout, t: TrainerConfig,
                  env: Optional[RolloutEnv] = None) -> None:
    """Fill old_logprobs, values and ref_logprobs (micro batch at a time, eval mode).
    Without a reference (has_reference) ref_logprobs = old_logprobs (KL 0) and
    roll.has_reference is False. The reference pass runs after the policy pass, with the
    adapter disabled once for all micro batches (PEFT's disable_adapter walks the model)."""
    env = env or RolloutEnv()
    B, T = roll.completion.shape
    for key in ("old_logprobs", "values"):
        roll.extra[key] = torch.zeros(B, T, dtype=torch.float32, device=roll.completion.device)
    roll.has_reference = has_reference(policy, reference, t)
    batches = [(rows, roll.batch(rows)) for rows in torch.arange(B, device=roll.completion.device).split(t.micro_batch)]
    was_training = policy.training
    policy.eval()
    try:
        for rows, batch in batches:                                           # trimmed: (b, L'), (b, T')
            T_b = batch["completion"].shape[1]
            with env.phase(Phase.scoring), env.autocast():
                logits, hidden = forward_completion(policy, batch, t.temperature)  # (b, T', V), (b, T', H)
                old = logprobs_from_logits(logits, batch["completion"])
                del logits
                values = critic.values(policy, batch, hidden)
            roll.extra["old_logprobs"][rows, :T_b] = old
            roll.extra["values"][rows, :T_b] = values
        roll.extra["ref_logprobs"] = roll.extra["old_logprobs"]
        if roll.has_reference:
            roll.extra["ref_logprobs"] = torch.zeros(B, T, dtype=torch.float32, device=roll.completion.device)
            with _reference_model(policy, reference) as model:
                for rows, batch in batches:
                    with env.phase(Phase.scoring), env.autocast():
                        ref = logprobs_from_logits(forward_completion(model, batch, t.temperature)[0], batch["completion"])
                    roll.extra["ref_logprobs"][rows, :batch["completion"].shape[1]] = ref
    finally:
        policy.train(was_training)


@contextlib.contextmanager
def _reference_model(policy, reference):
    """The reference model: a frozen copy, or the policy with its trainable adapter disabled."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def global_whiten(x: Tensor, mask: Tensor) -> Tensor:
    """masked_whiten with the mean and (unbiased) variance over every rank's tokens."""
    m = mask.to(x.dtype)
    s = dist.all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]))
    mean = s[0] / s[1].clamp(min=1.0)
    sq = dist.all_reduce_sum(((x - mean) ** 2 * m).sum().reshape(1))[0]
    n = s[1]
    var = sq / n.clamp(min=1.0) * (n / (n - 1) if n > 1 else 1.0)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), torch.zeros_like(x))


def compute_advantages(roll: Rollout, t: TrainerConfig) -> None:
    """KL-shaped token rewards (k1 x ppo.kl_coef) -> GAE advantages (whitened over all
    ranks' loss tokens with trainer.advantage_scaling=batch, raw with none) and returns,
    all (B, T); also the k3 estimate for train/kl."""
    mask = roll.mask
    kl = kl_per_token(roll["old_logprobs"], roll["ref_logprobs"]) * mask            # (B, T) k1
    token_rewards = build_token_rewards(roll.scores, kl, mask, t.ppo.kl_coef)        # (B, T)
    advantages, returns = compute_gae(token_rewards, roll["values"], mask, t.ppo.gamma, t.ppo.lam)
    if t.advantage_scaling == AdvantageScaling.batch:
        advantages = global_whiten(advantages, mask)
    elif t.advantage_scaling != AdvantageScaling.none:
        raise ValueError(f"PPO trainer.advantage_scaling={t.advantage_scaling.value}: expected batch|none")
    k3 = kl_k3(roll["old_logprobs"], roll["ref_logprobs"]) * mask
    roll.extra.update(kl=kl, kl_k3=k3, advantages=advantages, returns=returns)  # kl, k3 = 0 without a reference


def collect_rollout(policy, tokenizer, critic: Critic, reference, rows: List[dict], reward_funcs, t: TrainerConfig,
                    env: Optional[RolloutEnv] = None) -> Rollout:
    roll = generate_rollout(policy, tokenizer, rows, reward_funcs, t, env)
    score_rollout(policy, critic, reference, roll, t, env)
    compute_advantages(roll, t)
    return roll
