"""The readable torch backend of the fused linear + log-prob losses.

All backends implement one internal contract, the *token-weighted log-prob loss*:

    linear_logprob_loss(hidden [T, H], weight [V, H], labels [T], pg_coef [T] fp32,
                        ref_logprobs [T] fp32 | None, kl_weight 0-d fp32, temperature)
        -> (loss 0-d fp32, logprobs [T] fp32, entropy [T] fp32)

with, for every action token t (labels_t != -100),

    lp_t   = log_softmax(hidden_t @ weight^T / temperature)[labels_t]
    loss   = sum_t  -pg_coef_t * lp_t  +  kl_weight * (exp(d_t) - d_t - 1),   d_t = ref_t - lp_t
    dL/dlp_t = g_t = -pg_coef_t + kl_weight * (1 - exp(d_t))

`oreal.ops.loss` turns OREAL's per-sequence advantages, token-RM weights and token counts into
`pg_coef`, so the kernels only see per-token numbers. `pg_coef`, `ref_logprobs` and `kl_weight`
are constants for autograd.

The gradients are computed in the forward pass, chunk by chunk, so the `[T, V]` logits never
exist and nothing of size `V` is kept between forward and backward: per chunk of C tokens we form
the `[C, V]` logits, their softmax, the logit gradient `dz = g (onehot - p) / temperature`, and
accumulate `grad_hidden = dz @ weight`, `grad_weight += dz^T @ hidden`. Backward only scales the
stored gradients by the incoming scalar gradient. This is the right trade when the loss is the
end of the graph, as it is in training.
"""

from __future__ import annotations

import torch

# Elements of one [C, V] fp32 logit chunk; each chunk holds ~2 such buffers (logits, probabilities).
CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    return max(1, min(num_tokens, CHUNK_ELEMENTS // vocab_size))


def per_token_terms(logprobs, pg_coef, ref_logprobs, kl_weight, valid):
    """Per-token loss and its derivative with respect to the log-prob, both fp32, 0 where not valid."""
    loss = -pg_coef * logprobs
    grad = -pg_coef
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        ratio = torch.exp(delta)
        loss = loss + kl_weight * (ratio - delta - 1)
        grad = grad + kl_weight * (1 - ratio)
    return torch.where(valid, loss, 0.0), torch.where(valid, grad, 0.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 inputs (used for gradcheck) stay in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_forward_backward(h, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature):
    """Loss, log-probs, entropy and the logit gradient `dz [C, V]` (fp32) of one chunk."""
    valid = labels >= 0
    safe_labels = torch.where(valid, labels, 0).long()
    logits = (h @ weight.T).to(accumulation_dtype(h.dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    logprobs = logits.gather(1, safe_labels[:, None]).view(-1) - lse
    # entropy = lse - sum_v p_v z_v, summed in place over the logits buffer (no longer needed)
    entropy = lse - logits.mul_(probs).sum(-1)
    loss, grad = per_token_terms(logprobs, pg_coef, ref_logprobs, kl_weight, valid)
    scale = grad / temperature
    dz = probs.mul_(-scale[:, None])  # reuse the probability buffer for the logit gradient
    dz.scatter_add_(1, safe_labels[:, None], scale[:, None])
    return loss.sum(), torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0), dz


class _LinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature, chunk_size):
        num_tokens = hidden.shape[0]
        vocab_size = weight.shape[0]
        chunk = chunk_size or default_chunk_size(num_tokens, vocab_size)
        want_hidden_grad = ctx.needs_input_grad[0]
        want_weight_grad = ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        acc = accumulation_dtype(hidden.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight_grad else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        logprobs = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        entropy = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        pg_coef = pg_coef.to(acc)
        ref_logprobs = None if ref_logprobs is None else ref_logprobs.to(acc)
        kl_weight = kl_weight.to(acc)
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            h = hidden[start:end]
            ref = None if ref_logprobs is None else ref_logprobs[start:end]
            chunk_loss, logprobs[start:end], entropy[start:end], dz = _chunk_forward_backward(
                h, weight, labels[start:end], pg_coef[start:end], ref, kl_weight, temperature)
            loss += chunk_loss
            if want_hidden_grad:
                grad_hidden[start:end] = dz.to(weight.dtype) @ weight
            if want_weight_grad:
                grad_weight.addmm_(dz.T, h.to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature=1.0,
                        chunk_size=None):
    """Token-weighted log-prob loss over chunks of tokens (see the module docstring)."""
    return _LinearLogprobLoss.apply(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight,
                                    float(temperature), chunk_size)
