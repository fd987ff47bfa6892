"""Advantage estimators (GRPO group normalisation, GAE) and the PPO update helpers."""

import pytest
import torch

from oreal.algorithms.ppo_family import clipped_value_loss, explained_variance, should_skip_minibatch
from oreal.reward import gae_advantages, group_normalized_advantages, outcome_token_rewards


def test_group_normalized_advantages_match_formula():
    rewards = torch.where(torch.rand(48) < 0.5, 5.0, -5.0)
    groups = torch.arange(48) // 8
    adv = group_normalized_advantages(rewards, groups)
    for g in range(6):
        r = rewards[g * 8:(g + 1) * 8].double()
        expected = (r - r.mean()) / (r.std() + 1e-6) if r.std() > 0 else torch.zeros(8, dtype=torch.float64)
        assert torch.allclose(adv[g * 8:(g + 1) * 8].double(), expected, atol=1e-5)
    same = group_normalized_advantages(torch.tensor([5.0, 5.0, -5.0]), torch.tensor([0, 0, 1]))
    assert torch.equal(same, torch.zeros(3))


def _gae_loop(rewards, values, action, gamma, lam):
    """Token-by-token GAE over one sequence's action tokens."""
    idx = [t for t in range(len(action)) if action[t]]
    adv = [0.0] * len(action)
    next_v = next_a = 0.0
    for t in reversed(idx):
        delta = rewards[t] + gamma * next_v - values[t]
        next_a = delta + gamma * lam * next_a
        adv[t] = next_a
        next_v = values[t]
    return adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.9)])
def test_gae_matches_token_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    lens = [7, 1, 12, 0, 5]
    cu = torch.tensor([0, 7, 8, 20, 20, 25], dtype=torch.int32)
    labels = torch.randint(0, 10, (25,), generator=g)
    labels[[0, 1, 6, 7, 8, 9, 19, 24]] = -100  # prompts and last positions
    rewards = torch.randn(25, generator=g)
    values = torch.randn(25, generator=g)
    adv, ret = gae_advantages(rewards, values, labels, cu, gamma=gamma, lam=lam)
    for start, length in zip([0, 7, 8, 20, 20], lens):
        sl = slice(start, start + length)
        expected = _gae_loop(rewards[sl].tolist(), values[sl].tolist(), (labels[sl] != -100).tolist(), gamma, lam)
        assert torch.allclose(adv[sl].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    action = labels != -100
    assert torch.allclose(ret[action], adv[action] + values[action], atol=1e-6)
    assert (adv[~action] == 0).all() and (ret[~action] == 0).all()


def test_outcome_reward_with_gamma_one_gives_reward_minus_value():
    labels = torch.tensor([-100, 3, 4, 5, -100, -100, 2, -100])
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    token_rewards = outcome_token_rewards(torch.tensor([1.0, -1.0]), labels, cu)
    assert token_rewards.tolist() == [0, 0, 0, 1.0, 0, 0, -1.0, 0]
    values = torch.arange(8, dtype=torch.float32) / 10
    adv, _ = gae_advantages(token_rewards, values, labels, cu)
    # gamma = lam = 1: A_t = R - V_t on every action token
    assert torch.allclose(adv[[1, 2, 3]], 1.0 - values[[1, 2, 3]])
    assert torch.allclose(adv[6], -1.0 - values[6])


def test_clipped_value_loss_and_explained_variance():
    values = torch.tensor([1.0, 2.0, 0.0, 5.0])
    old = torch.tensor([0.0, 2.5, 0.0, 0.0])
    returns = torch.tensor([1.0, 1.0, 1.0, 9.0])
    mask = torch.tensor([True, True, True, False])
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: clip -> 0.2, max((0)^2, (0.8)^2) = 0.64; token 1: v=2 (within 0.5 of 2.5? clip to 2.3): max(1, 1.69)=1.69
    # token 2: max(1, 1) = 1
    assert torch.isclose(loss, torch.tensor(0.5 * (0.64 + 1.69 + 1.0) / 3))
    spread = torch.tensor([1.0, 2.0, 4.0, 9.0])
    assert torch.isclose(explained_variance(spread, spread, mask), torch.tensor(1.0))
    assert torch.isclose(explained_variance(torch.zeros(4), spread, mask), torch.tensor(0.0), atol=1e-6)
    # V = R/2 leaves half the spread unexplained: 1 - Var(R/2)/Var(R) = 0.75
    assert torch.isclose(explained_variance(spread / 2, spread, mask), torch.tensor(0.75), atol=1e-6)
    assert explained_variance(values, returns, mask) == 0  # constant returns: no variance to explain


def test_early_stop_single_process():
    assert should_skip_minibatch(torch.tensor(7.0), 5.0)
    assert not should_skip_minibatch(torch.tensor(1.3), 5.0)
    assert not should_skip_minibatch(torch.tensor(1e9), None)
