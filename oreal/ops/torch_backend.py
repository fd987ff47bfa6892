"""The readable torch backend of the fused linear + log-prob losses.

All backends implement the same internal contract. The OREAL op, the *token-weighted log-prob loss*:

    linear_logprob_loss(hidden [T, H], weight [V, H], labels [T], pg_coef [T] fp32,
                        ref_logprobs [T] fp32 | None, kl_weight 0-d fp32, temperature)
        -> (loss 0-d fp32, logprobs [T] fp32, entropy [T] fp32)

with, for every action token t (labels_t != -100),

    lp_t   = log_softmax(hidden_t @ weight^T / temperature)[labels_t]
    loss   = sum_t  -pg_coef_t * lp_t  +  kl_weight * (exp(d_t) - d_t - 1),   d_t = ref_t - lp_t
    dL/dlp_t = g_t = -pg_coef_t + kl_weight * (1 - exp(d_t))

and the PPO/GRPO op, the *clipped surrogate* (`linear_policy_loss`), with per-token advantages `A_t`,
old-policy log-probs, per-token scales `s_t` (the loss aggregation) and KL scales `k_t`:

    r_t  = exp(lp_t - old_t)
    loss = sum_t -s_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) + k_t (exp(d_t) - d_t - 1)
    g_t  = -s_t A_t r_t where the unclipped term is the minimum (0 where the clip is active)
           + k_t (1 - exp(d_t))

`oreal.ops.loss` turns sequence-level quantities into these per-token numbers, so kernels only see
per-token inputs. All per-token inputs are constants for autograd.

The gradients are computed in the forward pass, chunk by chunk, so the `[T, V]` logits never
exist and nothing of size `V` is kept between forward and backward: per chunk of C tokens we form
the `[C, V]` logits, their softmax, the logit gradient `dz = g (onehot - p) / temperature`, and
accumulate `grad_hidden = dz @ weight`, `grad_weight += dz^T @ hidden`. Backward only scales the
stored gradients by the incoming scalar gradient, in place in eager mode below float64 (so a second
backward through the same graph is refused by autograd's version check rather than answered wrongly;
float64, the gradcheck path, stays functional). This is
the right trade when the loss is the end of the graph, as it is in training. Under `torch.no_grad()`
(old-policy and reference log-prob passes) no gradient work is done at all.
"""

from __future__ import annotations

import torch

# Elements of one [C, V] fp32 logit chunk; each chunk holds ~2 such buffers (logits, probabilities).
CHUNK_ELEMENTS = 1 << 23


def is_eager(*tensors) -> bool:
    """True outside every tracer: plain tensors (not fake/functional subclasses), no proxy mode.

    Only then may a backward scale the gradients it saved in place: traced (torch.compile, export,
    opcheck), it stays functional and lets the compiler plan the buffers.
    """
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors if t is not None):
        return False
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
    except AttributeError:  # private API moved: stay on the safe, functional side
        return False


# Elements per block when a 16-bit gradient is rescaled in place through fp32 (a 64 MiB temporary).
_RESCALE_BLOCK = 1 << 24


def gradient_scale(bound: torch.Tensor) -> torch.Tensor:
    """A power of two `sigma` with `bound * sigma` in (1/2, 1], as a 0-d fp32 tensor on the device.

    Per-token coefficients are ~1/N (N: global action tokens, up to ~1e7), so 16-bit logit and hidden
    gradients would flush to zero before a loss scaler's factor arrives; stored times `sigma` they
    stay O(1). A power of two makes the scaling and the unscaling exact.
    """
    bound = bound.float().clamp(min=2.0 ** -60)
    return torch.exp2(-torch.ceil(torch.log2(bound)))


def scale_saved_gradient(grad: torch.Tensor, grad_loss: torch.Tensor, in_place: bool, dtype: torch.dtype,
                         grad_scale: torch.Tensor | None = None):
    """A gradient formed in forward (stored times `grad_scale`, when given) times the loss's incoming
    gradient, as `dtype`; in place when allowed.

    The factor `grad_loss / grad_scale` is applied in fp32 whatever the gradient's dtype: rounded to
    bf16 first, grad_output = 1/3 would bias every gradient by +0.2%, and a loss scaler's 2^16 would
    overflow fp16 outright.
    """
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    factor = grad_loss.to(wide)
    if grad_scale is not None:
        factor = factor / grad_scale.to(wide)
    if grad.dtype == wide:
        return (grad.mul_(factor) if in_place else grad * factor).to(dtype)
    if not in_place:
        return (grad.to(wide) * factor).to(dtype)
    for block in grad.view(-1).split(_RESCALE_BLOCK):  # a bounded fp32 temporary, not one of [T, H]
        block.copy_(block.to(wide) * factor)
    return grad.to(dtype)


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    return max(1, min(num_tokens, CHUNK_ELEMENTS // vocab_size))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 inputs (used for gradcheck) stay in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_k3_terms(logprobs, ref_logprobs, kl_scale):
    """k3 estimator of KL(pi || ref) per token, and its derivative with respect to lp."""
    delta = ref_logprobs - logprobs
    ratio = torch.exp(delta)
    return kl_scale * (ratio - delta - 1), kl_scale * (1 - ratio)


def _cast_tensors(fields: dict, dtype) -> dict:
    return {name: value.to(dtype) for name, value in fields.items() if isinstance(value, torch.Tensor)}


class OrealTerms:
    """Per-token loss and dL/dlp of OREAL's loss (see the module docstring), chunk by chunk.

    With `behavior_logprobs` (samples drawn by an older policy mu), every token's loss and gradient are
    multiplied by the detached, truncated importance weight `min(exp(lp_t - mu_t), importance_cap)`
    (DESIGN note "Off-policy OREAL" in `oreal.ops.loss`). When `mu_t == lp_t` the weight is exactly 1.0
    and the loss and gradients are bit for bit those of the on-policy loss.
    """

    def __init__(self, pg_coef, ref_logprobs, kl_weight, behavior_logprobs=None, importance_cap=None):
        self.pg_coef, self.ref_logprobs, self.kl_weight = pg_coef, ref_logprobs, kl_weight
        self.behavior_logprobs, self.importance_cap = behavior_logprobs, importance_cap

    def cast_(self, dtype):
        """Moves the per-token inputs to the accumulation dtype, in place."""
        self.__dict__.update(_cast_tensors(self.__dict__, dtype))

    def gradient_bound(self):
        """`max |dL/dlp|` with the KL ratio near 1: `max |pg_coef| + kl_weight` (0-d, on the device)."""
        bound = self.pg_coef.abs().amax() if self.pg_coef.numel() else self.pg_coef.new_zeros(())
        # Not times the importance cap: the power of two must be the on-policy one, or 16-bit gradients
        # would round differently with rho = 1 (values near fp16's subnormals); scaled values stay below
        # ~2 C max|weight|, far inside fp16's range for any sensible cap.
        return bound + (self.kl_weight if self.ref_logprobs is not None else 0.0)

    def __call__(self, logprobs, valid, start, end):
        coef = self.pg_coef[start:end]
        loss, grad = -coef * logprobs, -coef
        if self.ref_logprobs is not None:
            kl, kl_grad = kl_k3_terms(logprobs, self.ref_logprobs[start:end], self.kl_weight)
            loss, grad = loss + kl, grad + kl_grad
        if self.behavior_logprobs is not None:  # a constant per token: scales the loss and dL/dlp alike
            weight = truncated_importance_weight(logprobs, self.behavior_logprobs[start:end], self.importance_cap)
            loss, grad = loss * weight, grad * weight
        return torch.where(valid, loss, 0.0), torch.where(valid, grad, 0.0)


def truncated_importance_weight(logprobs, behavior_logprobs, cap):
    """`min(exp(lp - mu), cap)`, treated as a constant (exactly 1.0 where `lp == mu`, for any cap >= 1)."""
    return torch.exp(logprobs - behavior_logprobs).clamp(max=cap)


class ClippedSurrogateTerms:
    """Per-token loss and dL/dlp of the PPO clipped surrogate; also gathers ratio statistics."""

    def __init__(self, advantages, old_logprobs, token_scale, ref_logprobs, kl_scale, clip_low, clip_high):
        self.advantages, self.old_logprobs, self.token_scale = advantages, old_logprobs, token_scale
        self.ref_logprobs, self.kl_scale = ref_logprobs, kl_scale
        self.clip_low, self.clip_high = clip_low, clip_high
        self.clipped_tokens = self.ratio_sum = self.ratio_max = self.action_tokens = None

    def cast_(self, dtype):
        """Moves the per-token inputs to the accumulation dtype, in place."""
        self.__dict__.update(_cast_tensors(self.__dict__, dtype))

    def gradient_bound(self):
        """`max |dL/dlp|` taking the ratio at the clip bound and the KL ratio near 1 (0-d, on the device)."""
        if not self.token_scale.numel():
            return self.token_scale.new_zeros(())
        bound = (self.token_scale * self.advantages).abs().amax() * (1.0 + self.clip_high)
        return bound + (self.kl_scale.abs().amax() if self.ref_logprobs is not None else 0.0)

    def __call__(self, logprobs, valid, start, end):
        adv, scale = self.advantages[start:end], self.token_scale[start:end]
        ratio = torch.exp(logprobs - self.old_logprobs[start:end])
        unclipped = ratio * adv
        clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high) * adv
        use_unclipped = unclipped <= clipped
        loss = -scale * torch.minimum(unclipped, clipped)
        grad = torch.where(use_unclipped, -scale * unclipped, 0.0)  # d(r A)/dlp = r A
        if self.ref_logprobs is not None:
            kl, kl_grad = kl_k3_terms(logprobs, self.ref_logprobs[start:end], self.kl_scale[start:end])
            loss, grad = loss + kl, grad + kl_grad
        self._record(ratio, valid, ~use_unclipped)
        return torch.where(valid, loss, 0.0), torch.where(valid, grad, 0.0)

    def _record(self, ratio, valid, clip_active):
        clipped = (clip_active & valid).sum()
        ratio_sum = torch.where(valid, ratio, 0.0).sum()
        ratio_max = torch.where(valid, ratio, 0.0).amax() if ratio.numel() else ratio.new_zeros(())
        count = valid.sum()
        if self.clipped_tokens is None:
            self.clipped_tokens, self.ratio_sum, self.ratio_max, self.action_tokens = clipped, ratio_sum, ratio_max, count
        else:
            self.clipped_tokens = self.clipped_tokens + clipped
            self.ratio_sum = self.ratio_sum + ratio_sum
            self.ratio_max = torch.maximum(self.ratio_max, ratio_max)
            self.action_tokens = self.action_tokens + count

    def stats(self) -> dict:
        """Detached statistics over this call's action tokens (no host synchronisation)."""
        if self.action_tokens is None:  # no tokens at all
            zero = self.advantages.new_zeros((), dtype=torch.float32)
            return {"clip_fraction": zero, "ratio_mean": zero, "ratio_max": zero}
        count = self.action_tokens.clamp(min=1).float()
        return {"clip_fraction": self.clipped_tokens.float() / count, "ratio_mean": self.ratio_sum.float() / count,
                "ratio_max": self.ratio_max.float()}


def _chunk_forward_backward(h, weight, labels, terms, start, end, temperature):
    """Loss, log-probs, entropy and the logit gradient `dz [C, V]` of one chunk."""
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
    loss, grad = terms(logprobs, valid, start, end)
    scale = grad / temperature
    dz = probs.mul_(-scale[:, None])  # reuse the probability buffer for the logit gradient
    dz.scatter_add_(1, safe_labels[:, None], scale[:, None])
    return loss.sum(), torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0), dz


class _LinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, terms, temperature, chunk_size, grad_enabled):
        num_tokens = hidden.shape[0]
        vocab_size = weight.shape[0]
        chunk = chunk_size or default_chunk_size(num_tokens, vocab_size)
        # needs_input_grad follows requires_grad even under no_grad: the caller's grad mode decides
        want_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        want_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        acc = accumulation_dtype(hidden.dtype)
        terms.cast_(acc)
        # 16-bit hidden gradients are stored times a power of two (see gradient_scale); fp32/fp64 need none
        sigma = (gradient_scale(terms.gradient_bound() / temperature)
                 if want_hidden_grad and hidden.dtype in (torch.float16, torch.bfloat16) else None)
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight_grad else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        logprobs = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        entropy = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            h = hidden[start:end]
            chunk_loss, logprobs[start:end], entropy[start:end], dz = _chunk_forward_backward(
                h, weight, labels[start:end], terms, start, end, temperature)
            loss += chunk_loss
            if want_hidden_grad:
                grad_hidden[start:end] = (dz if sigma is None else dz * sigma).to(weight.dtype) @ weight
            if want_weight_grad:
                grad_weight.addmm_(dz.T, h.to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight, sigma)
        ctx.weight_dtype, ctx.acc_dtype = weight.dtype, acc
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        grad_hidden, grad_weight, sigma = ctx.saved_tensors
        # float64 is the gradcheck path, which differentiates one graph many times: keep it functional
        in_place = ctx.acc_dtype != torch.float64 and is_eager(grad_loss, grad_hidden, grad_weight)
        if grad_hidden is not None:
            grad_hidden = scale_saved_gradient(grad_hidden, grad_loss, in_place, grad_hidden.dtype, sigma)
        if grad_weight is not None:
            grad_weight = scale_saved_gradient(grad_weight, grad_loss, in_place, ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature=1.0,
                        chunk_size=None, *, behavior_logprobs=None, importance_cap=2.0):
    """OREAL's token-weighted log-prob loss over chunks of tokens (see the module docstring); with
    `behavior_logprobs [T]` fp32, each token's term is weighted by `min(exp(lp_t - mu_t), importance_cap)`."""
    terms = OrealTerms(pg_coef, ref_logprobs, kl_weight, behavior_logprobs, float(importance_cap))
    return _LinearLogprobLoss.apply(hidden, weight, labels, terms, float(temperature), chunk_size,
                                    torch.is_grad_enabled())


def linear_policy_loss(hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs, kl_scale,
                       clip_low, clip_high, temperature=1.0, chunk_size=None):
    """PPO's clipped surrogate over chunks of tokens; returns (loss, logprobs, entropy, stats)."""
    terms = ClippedSurrogateTerms(advantages, old_logprobs, token_scale, ref_logprobs, kl_scale,
                                  float(clip_low), float(clip_high))
    loss, logprobs, entropy = _LinearLogprobLoss.apply(hidden, weight, labels, terms, float(temperature),
                                                       chunk_size, torch.is_grad_enabled())
    return loss, logprobs, entropy, terms.stats()
