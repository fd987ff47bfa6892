"""Public API of the fused clipped-surrogate loss (PPO, GRPO with a DAPO token-level loss).

The counterpart of `fused_oreal_loss` for the recipes users compare OREAL against. Per action
token t, with `r_t = exp(lp_t - old_lp_t)`:

    loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t) + kl_coef * k3_t

`k3_t = exp(d_t) - d_t - 1`, `d_t = ref_lp_t - lp_t` (only with `ref_logprobs`). Aggregation:

- `loss_agg="token"` (DAPO): sum over action tokens / the action-token count (`num_tokens`, the
  global count across data-parallel ranks, when given).
- `loss_agg="sequence"`: mean over each sequence's action tokens, then mean over the sequences
  that have any (this call's sequences; `num_tokens` does not apply).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from oreal.ops import backends
from oreal.ops.loss import _safe_reciprocal
from oreal.ops.token_weights import sequence_ids
from oreal.ops.validation import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    check_count,
    check_cu_seqlens,
    check_finite_float,
    check_labels,
    check_linear_inputs,
    check_positive_float,
    check_tensor,
)

LOSS_AGGREGATIONS = ("token", "sequence")


class PolicyLossOutput(NamedTuple):
    """`loss` is differentiable; the rest is detached. Statistics are over action tokens."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def token_scales(labels, cu_seqlens, loss_agg, num_tokens=None):
    """Per-token aggregation weights `s_t` `[T]` fp32 (0 off action tokens)."""
    action = labels != IGNORE_INDEX
    if loss_agg == "token":
        count = action.sum().float() if num_tokens is None else num_tokens
        return torch.where(action, _safe_reciprocal(count), 0.0)
    seq = sequence_ids(cu_seqlens, labels.numel())
    num_seqs = cu_seqlens.numel() - 1
    per_seq = torch.zeros(num_seqs, device=labels.device).index_add_(0, seq, action.float())
    active_seqs = (per_seq > 0).sum().float()
    scale = _safe_reciprocal(per_seq)[seq] * _safe_reciprocal(active_seqs)
    return torch.where(action, scale, 0.0)


def fused_policy_loss(hidden, weight, labels, cu_seqlens, advantages, old_logprobs, ref_logprobs=None, *,
                      clip_low=0.2, clip_high=0.2, kl_coef=0.0, loss_agg="token", temperature=1.0,
                      num_tokens=None, backend="auto") -> PolicyLossOutput:
    """PPO's clipped surrogate over packed sequences, fused with the lm_head (no `[T, V]` logits).

    `advantages` is per token `[T]` or per sequence `[S]` (when S == T the two coincide unless a
    sequence is empty; it is then read per token). Other arguments as in `fused_oreal_loss`.
    """
    num_tokens_total, _, vocab_size = check_linear_inputs(hidden, weight)
    device = hidden.device
    check_labels(labels, num_tokens_total, vocab_size, device)
    num_seqs = check_cu_seqlens(cu_seqlens, num_tokens_total, device)
    check_tensor("advantages", advantages, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    if advantages.shape[0] not in (num_tokens_total, num_seqs):
        raise ValueError(f"advantages: expected [T]={num_tokens_total} per-token or [S]={num_seqs} "
                         f"per-sequence entries, got {advantages.shape[0]}")
    check_tensor("old_logprobs", old_logprobs, ndim=1, length=num_tokens_total, dtypes=FLOAT_DTYPES, device=device)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, ndim=1, length=num_tokens_total, dtypes=FLOAT_DTYPES,
                     device=device)
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("kl_coef", kl_coef)):
        check_finite_float(name, value)
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low: must lie in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high: must be non-negative, got {clip_high}")
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg: {loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    check_positive_float("temperature", temperature)
    num_tokens = check_count("num_tokens", num_tokens, device)
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a string, got {type(backend).__name__}")
    impl = backends.resolve(backend, device, op="linear_policy_loss")

    per_token = advantages.shape[0] == num_tokens_total
    adv = advantages.float() if per_token else advantages.float()[sequence_ids(cu_seqlens, num_tokens_total)]
    scale = token_scales(labels, cu_seqlens, loss_agg, num_tokens)
    ref = None if ref_logprobs is None else ref_logprobs.float()
    loss, logprobs, entropy, stats = impl.linear_policy_loss(
        hidden, weight, labels, adv, old_logprobs.float(), scale, ref, kl_coef * scale, float(clip_low),
        float(clip_high), float(temperature))
    return PolicyLossOutput(loss, logprobs, entropy, stats["clip_fraction"], stats["ratio_mean"],
                            stats["ratio_max"])
