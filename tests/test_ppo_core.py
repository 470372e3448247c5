"""Tests for finellama_rl.trainers.ppo_core (pure tensor PPO math)."""
import math

import pytest
import torch

from finellama_rl.trainers.ppo_core import (
    build_token_rewards, compute_gae, entropy_from_logits, explained_variance,
    kl_per_token, logprobs_from_logits, masked_mean, masked_whiten, policy_loss, value_loss,
)

LENGTHS = [1, 9, 4, 6, 2]  # B=5, T=9: includes a length-1 and a full-length sequence


def _mask_from_lengths(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def _reference_gae(rewards, values, length, gamma, lam):
    """Plain scalar per-sequence GAE; V after the last real token is 0."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_reference_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    lengths = LENGTHS[seed % 5:] + LENGTHS[:seed % 5]  # rotate so rows differ per seed
    mask = _mask_from_lengths(lengths, T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    # garbage in padded positions must not leak into real ones
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask.bool(), values, torch.full_like(values, -7e2))

    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    assert adv.shape == (B, T) and ret.shape == (B, T)
    for b, L in enumerate(lengths):
        ref = _reference_gae(rewards[b].tolist(), values[b].tolist(), L, gamma, lam)
        for t in range(L):
            assert adv[b, t].item() == pytest.approx(ref[t], abs=1e-10)
            assert ret[b, t].item() == pytest.approx(ref[t] + values[b, t].item(), abs=1e-10)
    pad = mask == 0
    assert pad.any()
    assert (adv[pad] == 0).all() and (ret[pad] == 0).all()


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[5.5, 4.5, 2.5, 0.0]]))


def test_build_token_rewards_score_at_last_real_token():
    B, T = 5, 9
    mask = _mask_from_lengths(LENGTHS, T)
    kl = torch.rand(B, T) + 0.1
    scores = torch.tensor([1.0, -2.0, 3.0, 0.5, 10.0])
    beta = 0.05
    r = build_token_rewards(scores, kl, mask, beta)
    assert r.shape == (B, T)
    for b, L in enumerate(LENGTHS):
        for t in range(T):
            if t < L - 1:
                expected = -beta * kl[b, t].item()
            elif t == L - 1:
                expected = -beta * kl[b, t].item() + scores[b].item()
            else:
                expected = 0.0
            assert r[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_kl_per_token_zero_when_equal():
    lp = torch.randn(3, 7)
    kl = kl_per_token(lp, lp.clone())
    assert (kl == 0).all()
    assert not (kl_per_token(lp, lp - 0.1) == 0).all()


def _pl(ratio, adv, eps=0.2):
    ratio = torch.tensor([[ratio]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    lp = torch.log(ratio).requires_grad_(True)
    loss, cf, akl = policy_loss(lp, old, torch.tensor([[adv]], dtype=torch.float64),
                                torch.ones(1, 1), eps)
    loss.backward()
    return loss.item(), cf.item(), akl.item(), lp.grad.item()


def test_policy_loss_ratio_one():
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    lp = torch.randn(1, 4)
    loss, cf, akl = policy_loss(lp, lp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert cf.item() == 0.0 and akl.item() == 0.0


def test_policy_loss_clip_branches_and_grads():
    # positive advantage, ratio 1.5 -> clipped at 1.2, zero gradient
    loss, cf, akl, grad = _pl(1.5, 2.0)
    assert loss == pytest.approx(-2.0 * 1.2) and cf == 1.0 and grad == 0.0
    assert akl == pytest.approx(0.5 * math.log(1.5) ** 2)
    # negative advantage, ratio 1.5 -> unclipped (pessimistic), nonzero gradient
    loss, cf, _, grad = _pl(1.5, -2.0)
    assert loss == pytest.approx(2.0 * 1.5) and cf == 0.0
    assert grad == pytest.approx(2.0 * 1.5)  # d(-A*exp(lp))/dlp = -A*ratio
    # negative advantage, ratio 0.5 -> clipped at 0.8, zero gradient
    loss, cf, _, grad = _pl(0.5, -2.0)
    assert loss == pytest.approx(2.0 * 0.8) and cf == 1.0 and grad == 0.0
    # positive advantage, ratio 0.5 -> unclipped, nonzero gradient
    loss, cf, _, grad = _pl(0.5, 2.0)
    assert loss == pytest.approx(-2.0 * 0.5) and cf == 0.0 and grad != 0.0


def test_policy_loss_mixed_batch_grads_per_token():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    lp = torch.log(ratio).requires_grad_(True)
    loss, cf, _ = policy_loss(lp, torch.zeros_like(ratio), adv, torch.ones(1, 4), 0.2)
    loss.backward()
    assert cf.item() == pytest.approx(0.5)
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0
    assert lp.grad[0, 1] != 0 and lp.grad[0, 3] != 0


def test_value_loss_inside_clip_range_is_half_mse():
    old = torch.tensor([[1.0, 2.0, 3.0]])
    v = old + torch.tensor([[0.05, -0.1, 0.0]])
    R = torch.tensor([[0.0, 1.0, 5.0]])
    loss, cf = value_loss(v, old, R, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(0.5 * ((v - R) ** 2).mean().item())
    assert cf.item() == 0.0


def test_value_loss_clipped_branch_when_larger():
    # v moved far from old toward R: clipped value (old+0.2) is further from R -> larger
    old, v, R = torch.tensor([[0.0]]), torch.tensor([[0.9]]), torch.tensor([[1.0]])
    loss, cf = value_loss(v, old, R, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 1.0) ** 2) and cf.item() == 1.0
    # v moved far away from R: unclipped is larger -> unclipped branch
    v2 = torch.tensor([[-1.0]])
    loss, cf = value_loss(v2, old, R, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (-1.0 - 1.0) ** 2) and cf.item() == 0.0


def test_value_loss_ignores_padding():
    mask = torch.tensor([[1, 1, 0]])
    old = torch.tensor([[0.0, 1.0, 2.0]])
    R = torch.tensor([[0.5, 0.0, 1.0]])
    v = torch.tensor([[0.1, 0.8, 2.0]])
    loss_a, _ = value_loss(v, old, R, mask, 0.2)
    v_b = v.clone()
    v_b[0, 2] = 123.0
    loss_b, _ = value_loss(v_b, old, R, mask, 0.2)
    assert loss_a.item() == loss_b.item()


def test_masked_whiten():
    torch.manual_seed(0)
    mask = _mask_from_lengths(LENGTHS, 9)
    x = torch.randn(5, 9) * 3 + 7
    x = torch.where(mask.bool(), x, torch.full_like(x, 1e4))
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-5
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()
    assert masked_mean(x, mask).item() == pytest.approx(x[mask.bool()].mean().item(), rel=1e-6)


def test_entropy_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64) * 4
    p = torch.softmax(logits, -1)
    ref = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    V = 50
    uni = torch.full((2, 3, V), 3.7)
    torch.testing.assert_close(entropy_from_logits(uni), torch.full((2, 3), math.log(V)))
    big = torch.tensor([[[1000.0, 0.0, -1000.0]]])  # stability: no NaN/inf
    assert torch.isfinite(entropy_from_logits(big)).all()


def test_logprobs_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 17)
    tokens = torch.randint(0, 17, (3, 4))
    ref = torch.distributions.Categorical(logits=logits).log_prob(tokens)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), ref)


def test_explained_variance():
    torch.manual_seed(0)
    mask = _mask_from_lengths(LENGTHS, 9)
    R = torch.randn(5, 9)
    assert explained_variance(R.clone(), R, mask) == pytest.approx(1.0)
    const = torch.full_like(R, masked_mean(R, mask).item())
    assert explained_variance(const, R, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(R, torch.ones_like(R), mask) == 0.0  # Var[R] == 0 -> 0.0
