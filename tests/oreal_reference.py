"""An independent float64 implementation of DESIGN.md's OREAL loss, written straight from the formula.

Deliberately naive: it materialises the logits, loops over sequences and tokens for the running
mean of the token-RM scores, and lets autograd differentiate. It shares no code with `oreal.ops`.
"""

from __future__ import annotations

import math

import torch


def reference_token_weights(rm_scores, labels, cu_seqlens, is_positive):
    weights = torch.zeros(labels.numel(), dtype=torch.float64)
    bounds = [int(x) for x in cu_seqlens]
    for i in range(len(bounds) - 1):
        total, count = 0.0, 0
        for t in range(bounds[i], bounds[i + 1]):
            if int(labels[t]) == -100:
                continue
            total += float(rm_scores[t])
            count += 1
            q = 1.0 / (1.0 + math.exp(-total / count))
            w = 2 * q - 1 if bool(is_positive[i]) else 1 - 2 * q
            weights[t] = min(max(w, 0.0), 1.0)
    return weights


def reference_oreal_loss(hidden, weight, labels, cu_seqlens, advantages, is_positive, rm_scores=None,
                         ref_logprobs=None, *, kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, temperature=1.0,
                         pos_tokens=None, neg_tokens=None, return_magnitude=False, behavior_logprobs=None,
                         importance_cap=2.0):
    """Returns (loss, logprobs, entropy), all float64; loss differentiable w.r.t. hidden and weight.

    With `return_magnitude=True` also returns sum_t |term_t|, the loss's L1 magnitude.
    With `behavior_logprobs` (samples of an older policy mu), every token's terms are multiplied by the
    constant rho_t = min(pi_t / mu_t, importance_cap), pi_t = exp(lp_t) taken without its gradient.
    """
    h = hidden.double()
    w = weight.double()
    logits = h @ w.T / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy_all = -(probs * log_probs).sum(-1)
    action = labels != -100
    safe = torch.where(action, labels, 0).long()
    lp = log_probs.gather(1, safe[:, None])[:, 0]
    bounds = [int(x) for x in cu_seqlens]
    seq_of = torch.zeros(labels.numel(), dtype=torch.long)
    for i in range(len(bounds) - 1):
        seq_of[bounds[i]:bounds[i + 1]] = i
    pos_mask = torch.tensor([bool(is_positive[int(s)]) for s in seq_of], dtype=torch.bool)
    n_pos = float((action & pos_mask).sum()) if pos_tokens is None else float(pos_tokens)
    n_neg = float((action & ~pos_mask).sum()) if neg_tokens is None else float(neg_tokens)
    n_all = n_pos + n_neg
    if rm_scores is None:
        tw = torch.ones(labels.numel(), dtype=torch.float64)
    else:
        tw = reference_token_weights(rm_scores, labels, cu_seqlens, is_positive)
    loss = torch.zeros((), dtype=torch.float64)
    magnitude = 0.0  # sum of |term|: the scale that fp32 rounding of the loss is proportional to
    for t in range(labels.numel()):
        if not bool(action[t]):
            continue
        i = int(seq_of[t])
        positive = bool(is_positive[i])
        coef, count = (pos_coef, n_pos) if positive else (neg_coef, n_neg)
        rho = 1.0
        if behavior_logprobs is not None:
            rho = min(math.exp(lp[t].item() - float(behavior_logprobs[t])), importance_cap)
        if count > 0:
            term = -coef * float(advantages[i]) * float(tw[t]) / count * lp[t] * rho
            loss = loss + term
            magnitude += abs(term.item())
        if ref_logprobs is not None and n_all > 0:
            d = float(ref_logprobs[t]) - lp[t]
            term = kl_coef / n_all * (torch.exp(d) - d - 1) * rho
            loss = loss + term
            magnitude += abs(term.item())
    zero = torch.zeros((), dtype=torch.float64)
    logprobs = torch.where(action, lp, zero).detach()
    entropy = torch.where(action, entropy_all, zero).detach()
    if return_magnitude:
        return loss, logprobs, entropy, magnitude
    return loss, logprobs, entropy
