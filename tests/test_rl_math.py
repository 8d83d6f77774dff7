"""The PPO math in camelid.train.rl against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from camelid.train import rl

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)

M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 has 3 response tokens, row 2 has 2


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    # masked entries 1,2,3,4,5: mean 3; the 100 is ignored
    assert rl.masked_mean(x, M).item() == pytest.approx(3.0)
    assert rl.masked_mean(x, M, dim=1).tolist() == pytest.approx([2.0, 4.5])
    # squared deviations 4,1,0,1,4 sum to 10; unbiased variance 10/4 = 2.5
    mean, var = rl.moments_from_sums(rl.masked_sums(x, M))
    assert (mean.item(), var.item()) == pytest.approx((3.0, 2.5))
    w = rl.masked_whiten(x, M)
    s = math.sqrt(2.5)
    expected = torch.tensor([[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])  # masked slot -> 0
    assert torch.allclose(w, expected, atol=1e-6)
    # scale only: (x - 3)/s + 3
    w2 = rl.masked_whiten(x, M, shift_mean=False)
    assert w2[0, 0].item() == pytest.approx(-2 / s + 3, abs=1e-6)


def test_whiten_from_split_sums_equals_whole_batch():
    """What data parallel does: each process sums its rows, the sums are added, then whitened."""
    torch.manual_seed(0)
    x, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
    split = rl.masked_sums(x[:2], mask[:2]) + rl.masked_sums(x[2:], mask[2:])
    stats = rl.moments_from_sums(split)
    whole = rl.masked_whiten(x, mask)
    assert torch.allclose(rl.masked_whiten(x[:2], mask[:2], stats=stats), whole[:2], atol=1e-6)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    ones = torch.ones(1, 3)
    assert rl.explained_variance(returns, returns, ones).item() == pytest.approx(1.0)
    # predicting the mean (2) leaves all variance unexplained
    assert rl.explained_variance(torch.full((1, 3), 2.0), returns, ones).item() == pytest.approx(0.0)


def test_logprobs_and_entropy():
    # uniform over 4 tokens: log p = -log 4 for any label; entropy = log 4
    logits = torch.zeros(1, 2, 4)
    assert torch.allclose(rl.logprobs_from_logits(logits, torch.tensor([[0, 3]])), torch.full((1, 2), -math.log(4)))
    assert torch.allclose(rl.entropy_from_logits(logits), torch.full((1, 2), math.log(4)))
    # a (nearly) certain distribution has entropy ~0
    sharp = torch.tensor([[[100.0, 0.0, 0.0, 0.0]]])
    assert rl.entropy_from_logits(sharp).item() == pytest.approx(0.0, abs=1e-6)
    # Both from one log-softmax: the same numbers as the two functions.
    labels = torch.tensor([[0, 3]])
    lp, ent = rl.logprobs_and_entropy(logits, labels)
    assert torch.equal(lp, rl.logprobs_from_logits(logits, labels)) and torch.equal(ent, rl.entropy_from_logits(logits))


def test_response_mask_after_eos():
    eos = 9
    ids = torch.tensor([
        [5, 6, 9, 7, 8],  # EOS at 2: keep 5 6 9, drop the 7 8 sampled after it
        [5, 6, 7, 8, 0],  # no EOS, length 4: last slot is padding
        [9, 9, 1, 1, 1],  # EOS first: only the EOS token itself counts
    ])
    mask = rl.response_mask(ids, torch.tensor([5, 4, 5]), (eos,))
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    # without EOS ids only the lengths matter
    assert rl.response_mask(ids, torch.tensor([5, 4, 5])).tolist()[0] == [1, 1, 1, 1, 1]


def test_kl_penalty_kinds():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # differences: +0.5 and -1.0
    assert rl.kl_penalty(lp, ref, "kl").tolist() == [[0.5, -1.0]]
    assert rl.kl_penalty(lp, ref, "abs").tolist() == [[0.5, 1.0]]
    assert rl.kl_penalty(lp, ref, "mse").tolist() == [[0.125, 0.5]]
    with pytest.raises(ValueError):
        rl.kl_penalty(lp, ref, "full")


def test_per_token_rewards_puts_score_on_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
    scores = torch.tensor([1.0, -2.0])
    rewards, non_score = rl.per_token_rewards(scores, kl, M, kl_coef=0.5)
    # non-score = -0.5 * kl where masked; the 9.9 after the end is dropped
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]]))
    # score 1.0 lands on row 1's 3rd token, -2.0 on row 2's 2nd (its last real one)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -2.25, 0.0]]))


def gae_loop(values, rewards, mask, gamma, lam):
    """The textbook reversed recursion, one sequence and one step at a time."""
    b, t = values.shape
    adv = torch.zeros(b, t)
    for i in range(b):
        last = 0.0
        for k in reversed(range(t)):
            if mask[i, k] == 0:
                last = 0.0
                continue
            next_v = values[i, k + 1].item() if k + 1 < t and mask[i, k + 1] else 0.0
            delta = rewards[i, k].item() + gamma * next_v - values[i, k].item()
            last = delta + gamma * lam * last
            adv[i, k] = last
    return adv


def test_gae_by_hand():
    # one sequence, 2 tokens, γ = 1, λ = 0.5, V = [1, 2], r = [0, 3]
    # δ_1 = 3 + 0 − 2 = 1;  δ_0 = 0 + 2 − 1 = 1;  A_1 = 1;  A_0 = δ_0 + 0.5·A_1 = 1.5
    v, r = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 3.0]])
    adv, ret = rl.gae(v, r, torch.ones(1, 2), gamma=1.0, lam=0.5)
    assert adv.tolist() == [[1.5, 1.0]]
    assert ret.tolist() == [[2.5, 3.0]]  # returns = advantages + values


def test_gae_vectorised_equals_loop():
    torch.manual_seed(0)
    values, rewards = torch.randn(4, 7), torch.randn(4, 7)
    mask = rl.response_mask(torch.zeros(4, 7, dtype=torch.long), torch.tensor([7, 3, 1, 5]))
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = rl.gae(values, rewards, mask, gamma, lam)
        expected = gae_loop(values, rewards, mask, gamma, lam)
        assert torch.allclose(adv, expected, atol=1e-5)
        assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)
        assert (adv[mask == 0] == 0).all()


def test_policy_loss_by_hand():
    # 3 tokens, advantages [1, 1, -1], ratios ρ = [1.5, 0.5, 1.5], ε = 0.2
    # tok 0: A>0, ρ=1.5 -> max(-1.5, -1.2) = -1.2 (clipped wins)
    # tok 1: A>0, ρ=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped)
    # tok 2: A<0, ρ=1.5 -> max(1.5, 1.2)  = 1.5  (unclipped)
    # loss = (-1.2 - 0.5 + 1.5)/3 = -0.0667; clipfrac 1/3
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    out = rl.policy_loss(lp, old, adv, torch.ones(1, 3), clip=0.2)
    assert out["loss"].item() == pytest.approx(-0.2 / 3, abs=1e-6)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)
    assert out["ratio"].item() == pytest.approx(3.5 / 3)
    logr = torch.log(torch.tensor([1.5, 0.5, 1.5]))
    assert out["approxkl"].item() == pytest.approx(0.5 * logr.square().mean().item(), abs=1e-6)
    assert out["policykl"].item() == pytest.approx(-logr.mean().item(), abs=1e-6)
    # a masked token does not count
    masked = rl.policy_loss(lp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    assert masked["loss"].item() == pytest.approx((-1.2 - 0.5) / 2, abs=1e-6)


def test_policy_loss_gradient_is_zero_when_clipped():
    lp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    rl.policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)["loss"].backward()
    assert lp.grad.item() == 0.0


def test_value_loss_by_hand():
    # old V = 0, ε_v = 0.2, returns R = [1, 1]; new V = [0.5, 0.1]
    # tok 0: unclipped (0.5-1)² = 0.25, clipped V = 0.2 -> (0.2-1)² = 0.64; max 0.64 (clipped wins)
    # tok 1: within the clip range: both (0.1-1)² = 0.81
    # loss = ½·(0.64 + 0.81)/2 = 0.3625; clipfrac 1/2
    out = rl.value_loss(torch.tensor([[0.5, 0.1]]), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    assert out["loss"].item() == pytest.approx(0.3625)
    assert out["clipfrac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller_update():
    ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9 vs target 6: error = 9/6 - 1 = 0.5, clipped to 0.2; β ← 0.2·(1 + 0.2·256/10000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    # KL 4.5: error = -0.25 -> -0.2; β shrinks by the same factor the other way
    before = ctl.value
    ctl.update(4.5, n_steps=256)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10000))
    # KL 6.6: error 0.1, inside the clip
    before = ctl.value
    ctl.update(6.6, n_steps=100)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10000))
    restored = rl.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = rl.FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1


def test_length_sampler_range_and_resume():
    s = rl.LengthSampler(3, 5, seed=1)
    draws = s.sample(200)
    assert set(draws) == {3, 4, 5}  # both ends inclusive
    state = s.state_dict()
    nxt = s.sample(10)
    s2 = rl.LengthSampler(3, 5, seed=99)
    s2.load_state_dict(state)
    assert s2.sample(10) == nxt
    with pytest.raises(ValueError):
        rl.LengthSampler(5, 3)


def test_running_moments_matches_all_data():
    torch.manual_seed(0)
    data = torch.randn(30) * 3 + 2
    rm = rl.RunningMoments()
    for chunk in data.split(7):
        rm.update(chunk)
    assert rm.mean == pytest.approx(data.mean().item(), abs=1e-5)
    assert rm.var == pytest.approx(data.var(unbiased=False).item(), abs=1e-4)
    z = rm.normalise(data)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
