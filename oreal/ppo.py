"""Update-side helpers of the PPO family (PPO with a critic, GRPO with minibatch early-stop).

The policy's clipped surrogate lives in `oreal.ops.fused_policy_loss`; this module holds the small
pieces around it that never touch the vocabulary: the critic's clipped value loss, explained
variance, and the minibatch early-stop decision, which every data-parallel rank must take alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float, num_tokens=None) -> torch.Tensor:
    """PPO's clipped value loss, token mean: `0.5 * max((V - R)^2, (V_clip - R)^2)`,
    `V_clip = V_old + clamp(V - V_old, -clip, clip)`. `num_tokens`: a global token count, if given."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    count = mask.sum() if num_tokens is None else num_tokens
    return torch.where(mask, per_token, 0.0).sum() / torch.as_tensor(count, dtype=per_token.dtype).clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`1 - Var(R - V) / Var(R)` over the masked tokens: 1 is a perfect critic, <= 0 a useless one.
    NaN-free: 0 when the returns have no variance."""
    v, r = values[mask].double(), returns[mask].double()
    if r.numel() < 2:
        return torch.zeros((), dtype=torch.float32)
    var_r = r.var()
    if var_r <= 0:
        return torch.zeros((), dtype=torch.float32)
    return (1 - (r - v).var() / var_r).float()


def should_skip_minibatch(ratio_max: torch.Tensor, bound: float | None, group=None) -> bool:
    """RLinf's minibatch early-stop: skip the minibatch if the importance ratio anywhere in it (on
    any data-parallel rank) exceeds `bound`. All ranks get the same answer, so they all skip the
    backward pass together and FSDP's collectives stay matched. `bound=None` never skips."""
    if bound is None:
        return False
    worst = ratio_max.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return bool(worst.item() > bound)
