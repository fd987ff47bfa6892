"""The fused OREAL loss split into its terms, for logging: positive, negative and KL parts.

`fused_oreal_loss` returns one scalar; users want to see which part moves. The terms are recomputed
from its detached per-token log-probs (no second forward) with the same coefficients the loss used
(`oreal.ops.loss.oreal_token_coefficients`), so positive + negative + KL equals the fused loss.
"""

from __future__ import annotations

import torch

import oreal
from oreal.data import IGNORE_INDEX, PackedBatch
from oreal.ops.loss import oreal_token_coefficients

# Order of the entries of `loss_term_sums`.
TERMS = ("total", "positive", "negative", "kl", "entropy_sum", "k3_sum", "action_tokens", "tokens")


def loss_term_sums(batch: PackedBatch, out: oreal.LossOutput, *, kl_coef: float, pos_coef: float, neg_coef: float,
                   pos_tokens, neg_tokens, behavior_logprobs=None, importance_cap: float = 2.0) -> torch.Tensor:
    """float64 `[len(TERMS)]`: this micro-batch's share of each term (sums over its tokens). With
    `behavior_logprobs` (an off-policy step) the terms carry the loss's importance weight, as the loss does."""
    action = batch.labels != IGNORE_INDEX
    lp = out.logprobs.double()
    rho = 1.0
    if behavior_logprobs is not None:
        rho = torch.exp(out.logprobs.float() - behavior_logprobs.float()).clamp(max=importance_cap).double()
    if batch.rm_scores is not None:
        weights = oreal.token_rm_weights(batch.rm_scores, batch.labels, batch.cu_seqlens, batch.is_positive)
    else:
        weights = action.float()
    pg_coef, kl_weight = oreal_token_coefficients(batch.labels, batch.cu_seqlens, batch.advantages,
                                                  batch.is_positive, weights, kl_coef=kl_coef, pos_coef=pos_coef,
                                                  neg_coef=neg_coef, pos_tokens=pos_tokens, neg_tokens=neg_tokens)
    seq = torch.repeat_interleave(torch.arange(batch.num_sequences, device=lp.device),
                                  torch.as_tensor(batch.seq_lens, device=lp.device), output_size=batch.num_tokens)
    positive = batch.is_positive.bool()[seq] & action
    negative = ~batch.is_positive.bool()[seq] & action
    policy_gradient = -(pg_coef.double() * lp) * rho
    if batch.ref_logprobs is not None:
        d = batch.ref_logprobs.double() - lp
        k3 = torch.where(action, torch.exp(d) - d - 1, 0.0)
    else:
        k3 = torch.zeros_like(lp)
    weighted_k3 = (k3 * rho).sum() if behavior_logprobs is not None else k3.sum()
    zero = lp.new_zeros(())
    return torch.stack([
        out.loss.detach().double(),
        torch.where(positive, policy_gradient, zero).sum(),
        torch.where(negative, policy_gradient, zero).sum(),
        kl_weight.double() * weighted_k3,
        torch.where(action, out.entropy.double(), zero).sum(),
        k3.sum(),
        action.sum().double(),
        zero + (0 if batch.is_padding else batch.num_tokens),
    ])
