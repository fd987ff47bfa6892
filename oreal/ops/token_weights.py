"""Token-RM importance weights `w_t` over packed sequences (OREAL section 3.3), torch version.

For an action token t of sequence i, `c_t` is the running mean of the raw token-RM scores over
the action tokens of sequence i up to and including t, `q_t = sigmoid(c_t)`, and

    w_t = clamp(2 q_t - 1, 0, 1)   if sequence i is positive (reward +1)
    w_t = clamp(1 - 2 q_t, 0, 1)   if sequence i is negative (reward -1)

Non-action tokens (label -100) get weight 0 and do not enter the running mean.
"""

from __future__ import annotations

import torch

from oreal.ops.validation import IGNORE_INDEX


def sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The index of the sequence each packed token belongs to, `[T]` int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=num_tokens)


def running_mean_per_sequence(values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the masked tokens of each sequence up to and including t (0 before the first).

    A segmented scan written as a global prefix sum minus the prefix at each sequence start; the
    sums run in float64 so that long packed rows do not lose precision to cancellation.
    """
    num_tokens = values.numel()
    masked = torch.where(mask, values.double(), 0.0)
    sums = torch.cumsum(masked, 0)
    counts = torch.cumsum(mask.double(), 0)
    seq = sequence_ids(cu_seqlens, num_tokens)
    start = cu_seqlens[:-1].long()[seq]  # first token of each token's sequence
    zero = torch.zeros(1, dtype=torch.float64, device=values.device)
    sums_before = torch.cat([zero, sums])[start]
    counts_before = torch.cat([zero, counts])[start]
    counts_here = counts - counts_before
    return ((sums - sums_before) / counts_here.clamp(min=1)).float()


def token_rm_weights(rm_scores: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                     is_positive: torch.Tensor) -> torch.Tensor:
    """Per-token importance weights `w_t` `[T]` float32 (0 at non-action positions)."""
    mask = labels != IGNORE_INDEX
    mean_score = running_mean_per_sequence(rm_scores.float(), mask, cu_seqlens)
    q = torch.sigmoid(mean_score)
    positive = is_positive.bool()[sequence_ids(cu_seqlens, labels.numel())]
    w = torch.where(positive, 2 * q - 1, 1 - 2 * q).clamp(0, 1)
    return torch.where(mask, w, 0.0)
