"""Public API of the fused OREAL loss (DESIGN.md, "The fused OREAL loss").

`fused_oreal_loss` validates its inputs, folds OREAL's sequence-level quantities (advantage,
polarity, token-RM weight, positive/negative token counts, loss coefficients) into one per-token
coefficient, and hands the heavy part, `lm_head` matmul + log-softmax + gather + loss + gradients,
to a backend. The math, for action token t of sequence i:

    loss = sum_t -(coef_i * A_i * w_t / N_i) * lp_t  +  (kl_coef / N) * sum_t (exp(d_t) - d_t - 1)

with `d_t = ref_lp_t - lp_t`, `coef_i, N_i = pos_coef, N+` for positive sequences and
`neg_coef, N-` for negative ones, `N = N+ + N-`; a term whose count is 0 contributes 0.

DESIGN note: off-policy OREAL (`behavior_logprobs`, `rollout.max_staleness = 1`)
--------------------------------------------------------------------------------
OREAL's loss is an expectation over samples of the policy being trained: the positive term is behaviour
cloning of the correct samples *of pi* (the KL-regularised optimum conditioned on success), the negative
term a policy gradient `E_pi[A grad log pi]`, the KL term the k3 estimate of `KL(pi || ref)` under pi.
With one step of overlap the samples come from mu = pi_{k-1} (the weights the previous step started from)
while pi = pi_k is the policy taking the gradient step. For any per-token term f,
`E_{y~pi}[f] = E_{y~mu}[(pi(y)/mu(y)) f]`; as PPO and its off-policy variants do, the sequence ratio (a
product over tokens whose variance grows with the length) is replaced by the per-token ratio, so

    loss = sum_t rho_t * [ -(coef_i A_i w_t / N_i) lp_t + (kl_coef / N)(exp(d_t) - d_t - 1) ]
    rho_t = sg( min(exp(lp_t - mu_t), C) ),   mu_t = the behaviour policy's log-prob of token t

(`sg`: stop-gradient; `C = importance_cap >= 1`), hence `dL/dlp_t = rho_t * g_t` with `g_t` the on-policy
gradient. The same weight multiplies all three terms, so the gradient of every term is, in expectation,
the on-policy gradient of the paper's loss; the token-RM weights `w_t`, the RLOO advantages (a baseline,
unbiased under any sampler) and the one-pair filter (it looks at outcomes only) need no correction.

Which estimator: truncated importance sampling (TIS: `min(rho, C)`, as IMPALA's V-trace truncation and
the TIS correction used for engine/trainer mismatch). Decoupled PPO (Hilton et al. 2021; AReaL) splits the
ratio into a behaviour weight `pi_prox / mu` and a clipped `pi / pi_prox`; OREAL takes one gradient step
per batch, so the proximal policy *is* pi_k at the moment of the gradient, the clipped factor is 1, and
decoupled PPO reduces to exactly this weight. We truncate (clamp to C) rather than mask tokens above C as
AReaL does, because masking drops exactly the tokens pi has moved towards (the learning signal) and makes
the loss jump at C; truncation bounds the variance by C^2 at a bias only on those tokens. C >= 1 is
required so that on-policy tokens (rho = 1) are never down-weighted: with `behavior_logprobs == lp`
the loss and gradients are bit for bit those without it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from oreal.ops import backends
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


class LossOutput(NamedTuple):
    """`loss` is differentiable; `logprobs` and `entropy` `[T]` are detached, 0 off action tokens."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def _safe_reciprocal(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, 1.0 / count.clamp(min=1e-30), 0.0)


def oreal_token_coefficients(labels, cu_seqlens, advantages, is_positive, token_weights, *,
                             kl_coef, pos_coef, neg_coef, pos_tokens=None, neg_tokens=None):
    """Per-token policy-gradient coefficients `pg_coef [T]` and the KL weight `kl_coef / N` (0-d).

    Stays on the device: the counts are tensors, so this needs no host synchronisation.
    """
    action = labels != IGNORE_INDEX
    seq = sequence_ids(cu_seqlens, labels.numel())
    positive = is_positive.bool()[seq]
    if pos_tokens is None:
        pos_tokens = (action & positive).sum().float()
    if neg_tokens is None:
        neg_tokens = (action & ~positive).sum().float()
    per_pos = pos_coef * _safe_reciprocal(pos_tokens)
    per_neg = neg_coef * _safe_reciprocal(neg_tokens)
    scale = torch.where(positive, per_pos, per_neg)
    pg_coef = advantages.float()[seq] * scale * token_weights
    pg_coef = torch.where(action, pg_coef, 0.0)
    kl_weight = kl_coef * _safe_reciprocal(pos_tokens + neg_tokens)
    return pg_coef, kl_weight


def fused_oreal_loss(hidden, weight, labels, cu_seqlens, advantages, is_positive, rm_scores=None,
                     ref_logprobs=None, *, kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, temperature=1.0,
                     pos_tokens=None, neg_tokens=None, backend="auto", behavior_logprobs=None,
                     importance_cap=2.0) -> LossOutput:
    """OREAL's reshaped, token-RM-weighted, KL-regularised policy loss over packed sequences.

    Args:
        hidden: `[T, H]` final hidden states (bf16, fp16 or fp32; fp64 for checks).
        weight: `[V, H]` lm_head weight, same dtype.
        labels: `[T]` the token position t predicts, or -100 where t is not an action.
        cu_seqlens: `[S+1]` int32 sequence boundaries, 0 ... T.
        advantages: `[S]` per-sequence advantages.
        is_positive: `[S]` bool, the sequence's outcome reward is +1.
        rm_scores: `[T]` raw token-RM scores aligned with `labels`, or None for `w_t = 1`.
        ref_logprobs: `[T]` reference-policy log-probs aligned with `labels`, or None for no KL.
        pos_tokens, neg_tokens: global action-token counts (int or tensor) across data-parallel
            ranks; default: this call's counts.
        backend: "torch", "triton", "native" or "auto".
        behavior_logprobs: `[T]` log-probs of the labels under the policy that sampled them (the engine's),
            or None for on-policy samples. When given, each token's loss is weighted by the detached
            `min(exp(lp_t - behavior_t), importance_cap)` (module docstring, "off-policy OREAL"). Only the
            torch backend implements it: every backend choice ("auto", "triton", "native") then runs the
            log-prob loss on the torch backend, on the same device (the token-RM weights still come from
            the chosen backend).
        importance_cap: the truncation C >= 1 of that weight.

    Returns:
        LossOutput(loss, logprobs, entropy).
    """
    num_tokens, _, vocab_size = check_linear_inputs(hidden, weight)
    device = hidden.device
    check_labels(labels, num_tokens, vocab_size, device)
    num_seqs = check_cu_seqlens(cu_seqlens, num_tokens, device)
    check_tensor("advantages", advantages, ndim=1, length=num_seqs, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("is_positive", is_positive, ndim=1, length=num_seqs, device=device,
                 dtypes=(torch.bool, torch.int32, torch.int64, torch.uint8))
    if rm_scores is not None:
        check_tensor("rm_scores", rm_scores, ndim=1, length=num_tokens, dtypes=FLOAT_DTYPES, device=device)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, ndim=1, length=num_tokens, dtypes=FLOAT_DTYPES, device=device)
    if behavior_logprobs is not None:
        check_tensor("behavior_logprobs", behavior_logprobs, ndim=1, length=num_tokens, dtypes=FLOAT_DTYPES,
                     device=device)
        check_importance_cap(importance_cap)
    for name, value in (("kl_coef", kl_coef), ("pos_coef", pos_coef), ("neg_coef", neg_coef)):
        check_finite_float(name, value)
    check_positive_float("temperature", temperature)
    pos_tokens = check_count("pos_tokens", pos_tokens, device)
    neg_tokens = check_count("neg_tokens", neg_tokens, device)
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a string, got {type(backend).__name__}")
    impl = backends.resolve(backend, device)

    if rm_scores is None:
        token_weights = (labels != IGNORE_INDEX).float()
    else:
        token_weights = impl.token_rm_weights(rm_scores, labels, cu_seqlens, is_positive)
    pg_coef, kl_weight = oreal_token_coefficients(
        labels, cu_seqlens, advantages, is_positive, token_weights, kl_coef=kl_coef, pos_coef=pos_coef,
        neg_coef=neg_coef, pos_tokens=pos_tokens, neg_tokens=neg_tokens)
    ref = None if ref_logprobs is None else ref_logprobs.float()
    if behavior_logprobs is not None:  # off-policy: only the torch backend has the importance weight
        from oreal.ops import torch_backend

        loss, logprobs, entropy = torch_backend.linear_logprob_loss(
            hidden, weight, labels, pg_coef, ref, kl_weight, float(temperature),
            behavior_logprobs=behavior_logprobs.float(), importance_cap=float(importance_cap))
        return LossOutput(loss, logprobs, entropy)
    loss, logprobs, entropy = impl.linear_logprob_loss(hidden, weight, labels, pg_coef, ref, kl_weight,
                                                       float(temperature))
    return LossOutput(loss, logprobs, entropy)


def check_importance_cap(importance_cap) -> None:
    """The truncation C of the off-policy weight: a finite number >= 1 (below 1, on-policy tokens would lose weight)."""
    check_finite_float("importance_cap", importance_cap)
    if float(importance_cap) < 1.0:
        raise ValueError(f"importance_cap: must be >= 1 so that on-policy tokens keep weight 1, got {importance_cap}")


def token_rm_weights(rm_scores, labels, cu_seqlens, is_positive, *, backend="auto") -> torch.Tensor:
    """OREAL's per-token importance weights `w_t` `[T]` fp32 (see `oreal.ops.token_weights`)."""
    num_tokens = labels.shape[0] if isinstance(labels, torch.Tensor) else 0
    check_tensor("rm_scores", rm_scores, ndim=1, dtypes=FLOAT_DTYPES)
    device = rm_scores.device
    check_tensor("labels", labels, ndim=1, length=rm_scores.shape[0], device=device,
                 dtypes=(torch.int32, torch.int64))
    num_seqs = check_cu_seqlens(cu_seqlens, num_tokens, device)
    check_tensor("is_positive", is_positive, ndim=1, length=num_seqs, device=device,
                 dtypes=(torch.bool, torch.int32, torch.int64, torch.uint8))
    return backends.resolve(backend, device).token_rm_weights(rm_scores, labels, cu_seqlens, is_positive)


class OrealLoss(nn.Module):
    """`fused_oreal_loss` with its coefficients held by a module, for trainers that compose modules."""

    def __init__(self, *, kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, temperature=1.0, backend="auto",
                 importance_cap=2.0):
        super().__init__()
        self.kl_coef, self.pos_coef, self.neg_coef = kl_coef, pos_coef, neg_coef
        self.temperature, self.backend, self.importance_cap = temperature, backend, importance_cap

    def forward(self, hidden, weight, labels, cu_seqlens, advantages, is_positive, rm_scores=None,
                ref_logprobs=None, *, pos_tokens=None, neg_tokens=None, behavior_logprobs=None) -> LossOutput:
        return fused_oreal_loss(hidden, weight, labels, cu_seqlens, advantages, is_positive, rm_scores,
                                ref_logprobs, kl_coef=self.kl_coef, pos_coef=self.pos_coef,
                                neg_coef=self.neg_coef, temperature=self.temperature,
                                pos_tokens=pos_tokens, neg_tokens=neg_tokens, backend=self.backend,
                                behavior_logprobs=behavior_logprobs, importance_cap=self.importance_cap)

    def extra_repr(self) -> str:
        return (f"kl_coef={self.kl_coef}, pos_coef={self.pos_coef}, neg_coef={self.neg_coef}, "
                f"temperature={self.temperature}, backend={self.backend!r}")
