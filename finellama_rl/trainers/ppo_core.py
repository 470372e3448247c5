"""Pure tensor math for PPO on token sequences (no models, no config).

The training loop that calls these lives in ``finellama_rl/trainers/ppo.py``.

Conventions: B sequences, T completion tokens, right-padded; ``mask`` is a
(B, T) float/bool tensor that is 1 on real completion tokens and 0 on padding.

Formulas
--------
* Per-token reward (KL-shaped, RLHF style):
  r_t = -beta * kl_t, plus the scalar task score on the sequence's last real token.
* GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation"):
  delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
  with V and A after the last real token equal to 0 (the episode ends);
  returns R_t = A_t + V_t.
* Clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
  Algorithms"): rho_t = exp(logp_t - logp_old_t),
  L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)).
* Clipped value loss:
  L_V = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2).
* KL estimators (Schulman 2020, "Approximating KL Divergence"), with
  d_t = log pi_ref(a_t) - log pi(a_t): k1 = -d_t (reward shaping), k3 = exp(d_t) - d_t - 1
  (non-negative, TRL GRPO's estimator; the train/kl both trainers log).

The means above are over all real tokens of a mini-batch. The trainer sums the
per-token terms (``*_terms``) of each micro batch and divides by the mini-batch's
token count (over all ranks), so any split into micro batches gives the same gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_mean", "masked_var", "masked_whiten", "compute_gae", "build_token_rewards",
    "kl_per_token", "kl_k3", "policy_loss", "policy_loss_terms", "value_loss", "value_loss_terms",
    "entropy_from_logits",
    "logprobs_from_logits", "explained_variance",
]


def _fmask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where mask is 1 (an empty mask gives 0, not NaN)."""
    m = _fmask(mask, x)
    x = torch.where(m.bool(), x, torch.zeros_like(x))  # padded garbage (even NaN) never leaks
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked entries (Bessel-corrected if ``unbiased`` and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _fmask(mask, x).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to zero mean / unit variance over masked entries; padded entries -> 0.

    With ``shift_mean=False`` only the scale is normalised (the mean is added back).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
                ) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns, both (B, T); zero on padded positions.

    Reverse loop over T, vectorised over B. The bootstrap value/advantage carried
    backwards starts at 0 and only updates on real tokens, so each sequence's
    episode ends at its own last real token (uneven lengths are handled).
    """
    B, T = rewards.shape
    keep = mask.bool()                                   # (B, T)
    next_value = rewards.new_zeros(B)                    # (B,)  V_{t+1}
    next_adv = rewards.new_zeros(B)                      # (B,)  A_{t+1}
    advantages = torch.zeros_like(rewards)               # (B, T)
    for t in reversed(range(T)):
        m = keep[:, t]                                   # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv           # (B,)
        adv_t = torch.where(m, adv_t, torch.zeros_like(adv_t))
        advantages[:, t] = adv_t
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))  # (B, T)
    return advantages, returns


def build_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward (B, T): -kl_coef * kl on real tokens, + score (B,) at the last real token.

    Rows with no real token receive nothing (all zeros).
    """
    keep = mask.bool()                                                   # (B, T)
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros_like(kl))     # (B, T)
    T = kl.shape[1]
    pos = torch.arange(T, device=kl.device).expand_as(keep)              # (B, T)
    last = torch.where(keep, pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,)
    has_any = last >= 0                                                  # (B,)
    add = torch.where(has_any, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), add.unsqueeze(1))


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 KL estimator log pi(a) - log pi_ref(a), (B, T).

    Unbiased for KL(pi || pi_ref) in expectation under pi (can be negative per token);
    exactly zero when the policy equals the reference (identical log-probs).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 KL estimator exp(d) - d - 1 with d = log pi_ref - log pi, (B, T); >= 0, unbiased
    for KL(pi || pi_ref) under pi. TRL's GRPO uses it (in the loss when beta > 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def policy_loss_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                      clip_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate (B, T), clipped indicator and 0.5 * log_ratio^2 (both detached)."""
    log_ratio = logprobs - old_logprobs                                    # (B, T)
    ratio = torch.exp(log_ratio)                                           # (B, T)
    pg_unclipped = -advantages * ratio                                     # (B, T)
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    with torch.no_grad():
        clipped = (pg_clipped > pg_unclipped).float()
        approx_kl = 0.5 * log_ratio ** 2
    return torch.maximum(pg_unclipped, pg_clipped), clipped, approx_kl


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate. Returns (loss, clip_frac, approx_kl); the last two are detached."""
    terms, clipped, approx_kl = policy_loss_terms(logprobs, old_logprobs, advantages, clip_eps)
    return masked_mean(terms, mask), masked_mean(clipped, mask), masked_mean(approx_kl, mask)


def value_loss_terms(values: Tensor, old_values: Tensor, returns: Tensor,
                     clip_range_value: float) -> tuple[Tensor, Tensor]:
    """Per-token clipped value loss 0.5 * max((v-R)^2, (v_clip-R)^2) (B, T) and the clipped indicator."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2                               # (B, T)
    loss_clipped = (v_clipped - returns) ** 2                              # (B, T)
    with torch.no_grad():
        clipped = (loss_clipped > loss_unclipped).float()
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), clipped


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss 0.5 * mean max((v-R)^2, (v_clip-R)^2). Returns (loss, clip_frac)."""
    terms, clipped = value_loss_terms(values, old_values, returns, clip_range_value)
    return masked_mean(terms, mask), masked_mean(clipped, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Categorical entropy (B, T, V) -> (B, T): H = logsumexp(z) - sum softmax(z) * z."""
    probs = torch.softmax(logits, dim=-1)                                  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) per position: (B, T, V), (B, T) -> (B, T).

    Memory note: log_softmax materialises a full (B, T, V) tensor; for large
    vocabularies (Qwen: ~152k) computing this in chunks over B/T is a later optimisation.
    """
    logp = torch.log_softmax(logits, dim=-1)                               # (B, T, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)        # (B, T)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked entries.

    Choice: if Var[R] == 0 (or there are no real tokens) the ratio is undefined and
    we return 0.0 (no variance explained) rather than NaN, so logging stays finite.
    """
    var_r = masked_var(returns, mask)
    if not torch.isfinite(var_r) or var_r.item() == 0.0:
        return 0.0
    return float(1.0 - masked_var(returns - values, mask) / var_r)
