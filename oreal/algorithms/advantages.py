"""Group-relative advantages."""

from __future__ import annotations

import torch


def _check_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must be 1-D of one length, got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")


def _grouped(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float64 rewards, each sample's group index 0..G-1, and G (for a non-empty batch)."""
    _, group = torch.unique(group_ids, return_inverse=True)
    return rewards.double(), group, int(group.max()) + 1


def _in_reward_dtype(advantages: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return advantages.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages, as OREAL's configs use them.

    With K samples of one prompt (same `group_ids`) and rewards r, `A_k = r_k - mean(r_j, j != k)`.
    A group of one sample has no baseline and gets advantage 0. Computed over all K samples,
    before any filtering. Returns a float tensor shaped like `rewards`.
    """
    _check_groups(rewards, group_ids)
    if rewards.numel() == 0:
        return rewards.float()
    r, group, num_groups = _grouped(rewards, group_ids)
    group_sum = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, r)
    group_size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, torch.ones_like(r))
    others = group_size[group] - 1
    baseline = (group_sum[group] - r) / others.clamp(min=1)
    advantages = torch.where(others > 0, r - baseline, 0.0)
    return _in_reward_dtype(advantages, rewards)


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: `(r_k - mean_g) / (std_g + eps)` over the samples of each prompt.

    The standard deviation is the unbiased one over the group (as DeepSeekMath's GRPO and RLinf
    use it); a group whose rewards are all equal gets advantage 0, as does a group of one.
    """
    _check_groups(rewards, group_ids)
    if rewards.numel() == 0:
        return rewards.float()
    r, group, num_groups = _grouped(rewards, group_ids)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    size = zeros.clone().index_add_(0, group, torch.ones_like(r))
    mean = zeros.clone().index_add_(0, group, r) / size
    centred = r - mean[group]
    variance = zeros.clone().index_add_(0, group, centred**2) / (size - 1).clamp(min=1)
    std = variance.sqrt()[group]
    advantages = torch.where(size[group] > 1, centred / (std + eps), 0.0)
    return _in_reward_dtype(advantages, rewards)


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                   cu_seqlens: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation over packed sequences, for PPO with a critic.

    `token_rewards [T]`, `values [T]` (the critic's estimate at each position) and `labels [T]`
    (-100 off action tokens) are aligned as the fused loss aligns them. The recursion runs over
    each sequence's action tokens only, from the last backwards:

        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next

    with `V_next = A_next = 0` after a sequence's last action token. Returns `(advantages, returns)`
    `[T]` float32, 0 off action tokens; `returns = advantages + values` are the critic's targets.
    A rule-based outcome reward is `token_rewards` holding the reward at each sequence's last
    action token and 0 elsewhere.
    """
    num_tokens = labels.numel()
    if token_rewards.shape != (num_tokens,) or values.shape != (num_tokens,):
        raise ValueError(f"token_rewards and values must be [T]={num_tokens}, got {tuple(token_rewards.shape)} "
                         f"and {tuple(values.shape)}")
    action = labels != -100
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    max_len = max(lengths, default=0)
    num_seqs = len(lengths)
    # Lay the packed row out as [S, max_len] (action tokens only, right-aligned at their positions)
    # so the backwards recursion is one vectorised step per position rather than per token.
    index = torch.full((num_seqs, max_len), -1, dtype=torch.long)
    for i, (start, length) in enumerate(zip(bounds, lengths)):
        index[i, :length] = torch.arange(start, start + length)
    index = index.to(labels.device)
    present = index >= 0
    safe = index.clamp(min=0)
    is_action = present & action[safe]
    rewards = torch.where(is_action, token_rewards.double()[safe], 0.0)
    vals = torch.where(is_action, values.double()[safe], 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(num_seqs, dtype=torch.float64, device=labels.device)
    next_advantage = torch.zeros_like(next_value)
    for step in reversed(range(max_len)):
        here = is_action[:, step]
        delta = rewards[:, step] + gamma * next_value - vals[:, step]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, step] = torch.where(here, advantage, 0.0)
        # non-action positions (prompt, padding) pass the running values through unchanged
        next_value = torch.where(here, vals[:, step], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    flat_adv = torch.zeros(num_tokens, dtype=torch.float64, device=labels.device)
    flat_adv[index[is_action]] = advantages[is_action]
    returns = torch.where(action, flat_adv + values.double(), 0.0)
    return flat_adv.float(), returns.float()


def outcome_token_rewards(rewards: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence outcome rewards `[S]` placed on each sequence's last action token, `[T]` float32.

    A sequence without action tokens (an empty response, a padding sequence) places nothing.
    """
    num_tokens = labels.numel()
    num_seqs = cu_seqlens.numel() - 1
    if rewards.shape != (num_seqs,):
        raise ValueError(f"rewards: expected [S]={num_seqs} per-sequence values, got {tuple(rewards.shape)}")
    action = labels != -100
    positions = torch.arange(num_tokens, device=labels.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=labels.device), lengths, output_size=num_tokens)
    last = torch.full((num_seqs,), -1, dtype=torch.long, device=labels.device)
    last = last.scatter_reduce(0, seq, torch.where(action, positions, -1), reduce="amax")
    out = torch.zeros(num_tokens, dtype=torch.float32, device=labels.device)
    has_actions = last >= 0
    out[last[has_actions]] = rewards.float().to(labels.device)[has_actions]
    return out


def kl_penalized_rewards(rewards: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                         logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward with a KL penalty in the reward (OpenRLHF's `init_kl_coef`, used by SimpleRL-Zero):
    the outcome reward on each sequence's last action token, minus `kl_coef * (lp_t - ref_lp_t)` (the k1
    estimate of KL(pi || pi_ref)) on every action token. `[T]` float32, 0 off action tokens."""
    out = outcome_token_rewards(rewards, labels, cu_seqlens)
    if kl_coef and ref_logprobs is not None:
        action = labels != -100
        out = out - kl_coef * torch.where(action, logprobs.float() - ref_logprobs.float(), 0.0)
    return out
