"""The PPO/GRPO clipped surrogate on the fused kernels: `linear_policy_loss` and its statistics.

Implements the torch backend's `linear_policy_loss` contract (`oreal.ops.torch_backend`):

    linear_policy_loss(hidden [T, H], weight [V, H], labels [T], advantages [T] fp32, old_logprobs [T] fp32,
                       token_scale [T] fp32, ref_logprobs [T] fp32 | None, kl_scale [T] fp32,
                       clip_low, clip_high, temperature)
        -> (loss 0-d fp32, logprobs [T] fp32, entropy [T] fp32,
            {"clip_fraction", "ratio_mean", "ratio_max"}: detached 0-d fp32)

It is the `LOSS_CLIPPED_SURROGATE` mode of `linear_logprob.py`'s launches: the same forward kernel,
gradient matmuls, gradient scale and no-grad skip; only the softmax-gradient kernel's token loss
differs. That kernel writes each token's ratio and clip flag; the statistics are three torch
reductions over them on the device (no host synchronisation), over the action tokens.
"""

from __future__ import annotations

import torch

from .linear_logprob import IGNORE_INDEX, ClippedSurrogate, _LinearLogprobLoss


def clip_statistics(labels: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor) -> dict:
    """Clip fraction, mean and max ratio over the action tokens (0 when there are none).

    `ratio` and `clipped` are 0 off action tokens and ratios are positive, so plain sums and the max
    over all tokens are the action-token ones.
    """
    count = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    ratio_max = ratio.amax() if ratio.numel() else ratio.new_zeros(())
    return {"clip_fraction": clipped.sum() / count, "ratio_mean": ratio.sum() / count, "ratio_max": ratio_max}


def linear_policy_loss(hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs, kl_scale,
                       clip_low, clip_high, temperature=1.0, chunk_size=None):
    """PPO's clipped surrogate with fused gradients; returns (loss, logprobs, entropy, stats)."""
    num_tokens = hidden.shape[0] if hidden.dim() == 2 else 0
    device = hidden.device
    if not isinstance(kl_scale, torch.Tensor):  # a plain number: the same KL scale for every token
        kl_scale = torch.full((num_tokens,), float(kl_scale), dtype=torch.float32, device=device)
    statistics = torch.zeros((2, num_tokens), dtype=torch.float32, device=device)
    surrogate = ClippedSurrogate(advantages.contiguous(), old_logprobs.contiguous(), statistics[0], statistics[1],
                                 float(clip_low), float(clip_high))
    loss, logprobs, entropy = _LinearLogprobLoss.apply(
        hidden, weight, labels, token_scale, ref_logprobs, kl_scale, surrogate, float(temperature), chunk_size,
        torch.is_grad_enabled())
    return loss, logprobs, entropy, clip_statistics(labels, surrogate.ratio, surrogate.clipped)
