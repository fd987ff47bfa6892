"""The native backend: `oreal._C` (csrc/), C++ kernels for CPU tensors and CUDA kernels for CUDA tensors.

Implements the internal contract of `oreal.ops.torch_backend` (same signatures and semantics).
The extension registers three torch.library custom ops, `torch.ops.oreal_native.*`; this module adds
what torch needs around them, so that they work under autograd and `torch.compile`:

- fake (meta) implementations, giving output shapes without running anything;
- an autograd formula for the two loss ops, `linear_logprob_loss_fwd` (OREAL) and
  `linear_policy_loss_fwd` (PPO's clipped surrogate). Each op computes the gradients of the loss
  w.r.t. `hidden` and `weight` during its forward, chunk by chunk, stored times `grad_scale` (a
  power of two keeping fp16 gradients out of the subnormals, its last output); backward only scales
  them by `grad_output / grad_scale`, in fp32. In eager mode it scales in place, so that the fp32 weight
  gradient (as large as the weight) is never held twice; a second backward through the same graph
  is then refused by autograd's saved-tensor version check.

Import never fails when the extension is missing: `unavailable_reason` says why instead.
"""

from __future__ import annotations

import torch

from oreal.ops.torch_backend import is_eager, scale_saved_gradient

try:
    from oreal import _C
except ImportError as exc:  # not built: pip install --no-build-isolation -e .
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> str | None:
    """None if the native kernels can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if _C is None:
        return (f"the extension oreal._C is not built ({_IMPORT_ERROR}); build it with "
                "`pip install --no-build-isolation -e .` (needs torch importable at build time)")
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _C.with_cuda:
            return ("oreal._C was built without CUDA kernels (torch without CUDA, no nvcc found, or "
                    "OREAL_SKIP_CUDA_BUILD=1); rebuild with nvcc available")
        return None
    return f"oreal._C has kernels for CPU and CUDA tensors only, got {device.type}"


def _require_built() -> None:
    if _C is None:
        raise RuntimeError(unavailable_reason(torch.device("cpu")))


if _C is not None:

    def _loss_outputs_fake(hidden, weight, grad_hidden, grad_weight):
        num_tokens = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (
            hidden.new_empty((), **f32),
            hidden.new_empty((num_tokens,), **f32),
            hidden.new_empty((num_tokens,), **f32),
            hidden.new_empty(tuple(hidden.shape) if grad_hidden else (0,)),
            hidden.new_empty(tuple(weight.shape) if grad_weight else (0,), **f32),
            hidden.new_empty((), **f32),
        )

    @torch.library.register_fake("oreal_native::linear_logprob_loss_fwd")
    def _linear_logprob_loss_fwd_fake(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature,
                                      chunk_size, grad_hidden, grad_weight):
        return _loss_outputs_fake(hidden, weight, grad_hidden, grad_weight)

    @torch.library.register_fake("oreal_native::linear_policy_loss_fwd")
    def _linear_policy_loss_fwd_fake(hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs,
                                     kl_scale, clip_low, clip_high, temperature, chunk_size, grad_hidden,
                                     grad_weight):
        return _loss_outputs_fake(hidden, weight, grad_hidden, grad_weight)

    @torch.library.register_fake("oreal_native::token_rm_weights")
    def _token_rm_weights_fake(rm_scores, labels, cu_seqlens, is_positive):
        return rm_scores.new_empty(rm_scores.shape, dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        weight = inputs[1]
        _loss, logprobs, entropy, grad_hidden, grad_weight, grad_scale = output
        ctx.mark_non_differentiable(logprobs, entropy, grad_hidden, grad_weight, grad_scale)
        # Otherwise autograd hands backward zero-filled gradients for every unused output, the two
        # gradient buffers included: as much memory again as the gradients themselves.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_scale)
        ctx.weight_dtype = weight.dtype
        ctx.num_inputs = len(inputs)

    def _backward(ctx, grad_loss, _grad_logprobs, _grad_entropy, _grad_gh, _grad_gw, _grad_scale):
        grad_hidden, grad_weight, grad_scale = ctx.saved_tensors
        num_inputs = ctx.num_inputs
        if grad_loss is None:  # the loss itself received no gradient
            return (None,) * num_inputs
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # In eager mode the saved gradients belong to this graph alone: scale them in place. Traced
        # (torch.compile, export, opcheck), stay functional and let the compiler plan the buffers.
        in_place = is_eager(grad_loss, grad_hidden, grad_weight)
        out_hidden = out_weight = None
        if want_hidden and grad_hidden.dim() == 2:  # [0] when the op was told not to compute it
            out_hidden = scale_saved_gradient(grad_hidden, grad_loss, in_place, grad_hidden.dtype, grad_scale)
        if want_weight and grad_weight.dim() == 2:
            out_weight = scale_saved_gradient(grad_weight, grad_loss, in_place, ctx.weight_dtype, grad_scale)
        return (out_hidden, out_weight) + (None,) * (num_inputs - 2)

    for _op in ("linear_logprob_loss_fwd", "linear_policy_loss_fwd"):
        torch.library.register_autograd(f"oreal_native::{_op}", _backward, setup_context=_setup_context)


def linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature=1.0,
                        chunk_size=None):
    """Token-weighted log-prob loss (see `oreal.ops.torch_backend`): (loss, logprobs, entropy)."""
    _require_built()
    if hidden.dtype == torch.float64:
        # float64 inputs are for gradcheck-grade checks: the kernels accumulate in fp32, the torch
        # backend in float64, so those calls go there.
        from oreal.ops import torch_backend

        return torch_backend.linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight,
                                                 temperature, chunk_size)
    grad_enabled = torch.is_grad_enabled()
    want_hidden = grad_enabled and hidden.requires_grad
    want_weight = grad_enabled and weight.requires_grad
    if not isinstance(kl_weight, torch.Tensor):
        kl_weight = torch.tensor(float(kl_weight), dtype=torch.float32, device=hidden.device)
    loss, logprobs, entropy, *_ = torch.ops.oreal_native.linear_logprob_loss_fwd(
        hidden, weight, labels, pg_coef, ref_logprobs, kl_weight.to(torch.float32), float(temperature),
        int(chunk_size or 0), want_hidden, want_weight)
    return loss, logprobs, entropy


def linear_policy_loss(hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs, kl_scale,
                       clip_low, clip_high, temperature=1.0, chunk_size=None):
    """PPO's clipped surrogate (see `oreal.ops.torch_backend`): (loss, logprobs, entropy, stats).

    `stats` holds 0-d fp32 tensors `clip_fraction`, `ratio_mean`, `ratio_max` over action tokens,
    computed here from the returned log-probs (r_t = exp(lp_t - old_t)) exactly as the torch backend
    does, so the kernels need no extra reductions.
    """
    _require_built()
    if hidden.dtype == torch.float64:  # gradcheck-grade calls: see linear_logprob_loss
        from oreal.ops import torch_backend

        return torch_backend.linear_policy_loss(hidden, weight, labels, advantages, old_logprobs, token_scale,
                                                ref_logprobs, kl_scale, clip_low, clip_high, temperature,
                                                chunk_size)
    grad_enabled = torch.is_grad_enabled()
    want_hidden = grad_enabled and hidden.requires_grad
    want_weight = grad_enabled and weight.requires_grad
    loss, logprobs, entropy, *_ = torch.ops.oreal_native.linear_policy_loss_fwd(
        hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs, kl_scale, float(clip_low),
        float(clip_high), float(temperature), int(chunk_size or 0), want_hidden, want_weight)
    stats = _clip_statistics(logprobs, labels, advantages, old_logprobs, float(clip_low), float(clip_high))
    return loss, logprobs, entropy, stats


def _clip_statistics(logprobs, labels, advantages, old_logprobs, clip_low, clip_high) -> dict:
    """clip_fraction (the clipped term strictly smaller), ratio_mean, ratio_max over action tokens."""
    with torch.no_grad():
        valid = labels >= 0
        ratio = torch.where(valid, torch.exp(logprobs - old_logprobs), 0.0)
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
        count = valid.sum().clamp(min=1).float()
        ratio_max = ratio.amax() if ratio.numel() else ratio.new_zeros(())
        return {"clip_fraction": ((clipped < unclipped) & valid).sum().float() / count,
                "ratio_mean": ratio.sum() / count, "ratio_max": ratio_max.float()}


def token_rm_weights(rm_scores, labels, cu_seqlens, is_positive):
    """Per-token importance weights `w_t` `[T]` fp32 (see `oreal.ops.token_weights`)."""
    _require_built()
    return torch.ops.oreal_native.token_rm_weights(rm_scores, labels, cu_seqlens, is_positive)


def default_chunk_size(num_tokens: int, vocab_size: int, on_cuda: bool = False) -> int:
    """Rows per chunk the kernels use when `chunk_size` is None."""
    _require_built()
    return _C.default_chunk_size(num_tokens, vocab_size, on_cuda)
