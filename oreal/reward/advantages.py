"""Group-relative advantages."""

from __future__ import annotations

import torch


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages, as OREAL's configs use them.

    With K samples of one prompt (same `group_ids`) and rewards r, `A_k = r_k - mean(r_j, j != k)`.
    A group of one sample has no baseline and gets advantage 0. Computed over all K samples,
    before any filtering. Returns a float tensor shaped like `rewards`.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must be 1-D of one length, got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if rewards.numel() == 0:
        return rewards.float()
    r = rewards.double()
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    group_sum = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, r)
    group_size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, torch.ones_like(r))
    others = group_size[group] - 1
    baseline = (group_sum[group] - r) / others.clamp(min=1)
    advantages = torch.where(others > 0, r - baseline, 0.0)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.to(out_dtype)
