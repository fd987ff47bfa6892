"""Fused `lm_head` + log-softmax + target gather + entropy + token loss + gradients, in Triton.

Implements the internal contract of `oreal.ops.torch_backend` (read its docstring):

    linear_logprob_loss(hidden [T, H], weight [V, H], labels [T], pg_coef [T] fp32,
                        ref_logprobs [T] fp32 | None, kl_weight 0-d fp32, temperature)
        -> (loss 0-d fp32, logprobs [T] fp32, entropy [T] fp32)

and, through the same launches in a second loss mode, the PPO clipped surrogate
(`linear_policy_loss`, public in `policy_loss.py`; its per-token inputs are a `ClippedSurrogate`).

Per chunk of C tokens, four launches; the `[T, V]` logits never exist, the `[C, V]` buffer is reused:

1. `_logits_lse_fwd_kernel`, grid (token blocks x vocabulary splits): `z = hidden @ weight^T / temp`
   tile by tile on tensor cores (fp32 accumulators), stores `z` to the chunk buffer (input dtype),
   and keeps an online log-sum-exp per token: running max `m`, `s = sum exp(z - m)` and
   `a = sum exp(z - m) z` (for the entropy), merged across the split's vocabulary blocks in
   registers, plus `s' = sum exp(z' - m)` over the *stored* (rounded) logits z' of 16-bit buffers, which
   kernel 2 normalises its probabilities with (README: "Confident tokens"); writes one (m, s, a, s')
   partial per split, and the target logit (fp32) from the split
   holding the label. Splitting the vocabulary keeps every SM busy when the chunk has few tokens.
2. `_softmax_grad_kernel`, grid (tokens x vocabulary slices): merges the partials
   (`lse = M + log S`, `entropy = lse - A / S`), computes `lp = z_label - lse`, the token loss and
   its derivative `g = dL/dlp` (per loss mode, below), and overwrites its slice of the buffer with
   the logit gradient `dz = g (onehot - softmax) / temp`, times a power-of-two scale `sigma` (below).
3. `_matmul_kernel`: `grad_hidden[chunk] = dz @ weight` (input dtype).
4. `_matmul_kernel`: `grad_weight += dz^T @ hidden` into an fp32 buffer.

Gradients are formed in the forward pass, as in the torch backend; backward multiplies them by
`grad_output / sigma`. Why `sigma`: per-token coefficients are ~1/N (N = global action tokens),
so logit gradients (times probabilities) and even the hidden gradient sit far below fp16's normal
range (6e-5) and would flush to zero before a loss scaler's factor could rescue them. Stored
scaled by sigma ~ 1 / max|dL/dlp|, they stay O(1); the power of two makes the scaling exact.

Loss modes are a `tl.constexpr` of kernel 2; kernels 1, 3 and 4, sigma and the no-grad skip are shared:

- `LOSS_LOGPROB` (OREAL): `loss_t = -coef_t lp_t + kl (exp(d_t) - d_t - 1)`, `d_t = ref_t - lp_t`,
  `g_t = -coef_t + kl (1 - exp(d_t))`, with `coef = pg_coef [T]` and `kl = kl_weight` (0-d).
- `LOSS_CLIPPED_SURROGATE` (PPO/GRPO): `r_t = exp(lp_t - old_t)`,
  `loss_t = -s_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) + k_t (exp(d_t) - d_t - 1)`,
  `g_t = -s_t A_t r_t` where the unclipped term is the minimum (else 0) `+ k_t (1 - exp(d_t))`, with
  `coef = s [T]` (the aggregation scale) and `kl = k [T]`. Only this mode loads the advantages and old
  log-probs, and it writes `r_t` and a clip flag per token, from which `policy_loss.py` forms the
  statistics on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import configs
from ._runtime import INTERPRET, DeviceInfo, KernelLaunch, cdiv, device_info, dot_precision, next_power_of_2
from .matmul import plan_matmul_into
from .rounding import cast_rounded

LOSS_LOGPROB = 0  # -pg_coef * lp + kl_weight * (exp(d) - d - 1), d = ref - lp
LOSS_CLIPPED_SURROGATE = 1  # -s * min(r A, clip(r) A) + k * (exp(d) - d - 1), r = exp(lp - old)
IGNORE_INDEX = -100
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _logits_lse_fwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr, logits_ptr,
    part_max_ptr, part_sum_ptr, part_dot_ptr, part_stored_sum_ptr, target_ptr,
    num_tokens, vocab_size, hidden_size, blocks_per_split,
    stride_hidden, stride_weight, stride_logits, stride_part,
    inv_temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_LOGITS: tl.constexpr,
    STORED_SUM: tl.constexpr,
):
    # Token blocks vary fastest, so the programs sharing a weight tile run side by side (L2 reuse).
    pid = tl.program_id(0)
    num_token_blocks = tl.cdiv(num_tokens, BLOCK_T)
    token_block = pid % num_token_blocks
    split = pid // num_token_blocks

    offs_t = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    rows = (offs_t % num_tokens).to(tl.int64)  # wrapped: loads need no token mask
    labels = tl.load(labels_ptr + offs_t, mask=t_mask, other=-100).to(tl.int32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    run_dot = tl.zeros((BLOCK_T,), tl.float32)
    run_stored_sum = tl.zeros((BLOCK_T,), tl.float32)
    target = tl.zeros((BLOCK_T,), tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < vocab_size
        vocab_rows = (offs_v % vocab_size).to(tl.int64)
        x_ptrs = hidden_ptr + rows[:, None] * stride_hidden + offs_h[None, :]
        w_ptrs = weight_ptr + vocab_rows[None, :] * stride_weight + offs_h[:, None]
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for h0 in range(0, hidden_size, BLOCK_H):
            h_left = hidden_size - h0
            x = tl.load(x_ptrs, mask=offs_h[None, :] < h_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_h[:, None] < h_left, other=0.0)
            if INTERPRETED:  # the interpreter multiplies raw bf16 bits: compute in fp32 there
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
        z = acc * inv_temperature
        # Under no_grad nothing reads the buffer: no store.
        z_stored = cast_rounded(z, logits_ptr.dtype.element_ty, INTERPRETED)
        if STORE_LOGITS:
            out_ptrs = logits_ptr + offs_t[:, None].to(tl.int64) * stride_logits + offs_v[None, :]
            tl.store(out_ptrs, z_stored, mask=t_mask[:, None] & v_mask[None, :])
        # columns past the vocabulary get a huge negative *finite* logit: exp() sends them to 0 and,
        # unlike -inf, 0 * z stays 0 in the entropy sum
        pad = tl.where(v_mask, 0.0, -1e30)[None, :]
        z += pad

        # online log-sum-exp and the entropy accumulator sum exp(z - m) z
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_dot = run_dot * rescale + tl.sum(p * z, axis=1)
        if STORED_SUM:
            # The softmax-gradient kernel forms probabilities from the *stored* (16-bit) logits, so it
            # normalises them by their own sum: against the fp32 log-sum-exp they would not sum to 1 and a
            # confident token's 1 - p would be the rounding noise of its logit (0.125 at z = 32 in bf16).
            # One more exp per logit (MUFU, hidden under the tensor cores); lp and entropy stay fp32-exact.
            p_stored = tl.exp(z_stored.to(tl.float32) + pad - new_max[:, None])
            run_stored_sum = run_stored_sum * rescale + tl.sum(p_stored, axis=1)
        run_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)

    part = split.to(tl.int64) * stride_part + offs_t
    tl.store(part_max_ptr + part, run_max, mask=t_mask)
    tl.store(part_sum_ptr + part, run_sum, mask=t_mask)
    tl.store(part_dot_ptr + part, run_dot, mask=t_mask)
    if STORED_SUM:
        tl.store(part_stored_sum_ptr + part, run_stored_sum, mask=t_mask)
    holds_label = t_mask & (labels >= v_begin) & (labels < v_end)
    tl.store(target_ptr + offs_t, target, mask=holds_label)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, part_max_ptr, part_sum_ptr, part_dot_ptr, part_stored_sum_ptr, target_ptr, labels_ptr,
    coef_ptr, ref_ptr, kl_ptr, grad_scale_ptr, advantages_ptr, old_logprobs_ptr,
    logprobs_ptr, entropy_ptr, token_loss_ptr, ratio_ptr, clipped_ptr,
    vocab_size, num_splits, vocab_per_program, stride_logits, stride_part,
    inv_temperature, ratio_low, ratio_high,
    HAS_REF: tl.constexpr, LOSS_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, INTERPRETED: tl.constexpr, STORED_SUM: tl.constexpr,
):
    token = tl.program_id(0)
    slice_id = tl.program_id(1)

    # merge the vocabulary splits' (max, sum, dot) partials; every program of the row does it (cheap)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_mask = offs_s < num_splits
    part = offs_s.to(tl.int64) * stride_part + token
    part_max = tl.load(part_max_ptr + part, mask=s_mask, other=float("-inf"))
    row_max = tl.max(part_max, axis=0)
    weights = tl.where(s_mask, tl.exp(part_max - row_max), 0.0)
    row_sum = tl.sum(tl.load(part_sum_ptr + part, mask=s_mask, other=0.0) * weights, axis=0)
    row_dot = tl.sum(tl.load(part_dot_ptr + part, mask=s_mask, other=0.0) * weights, axis=0)
    lse = row_max + tl.log(row_sum)
    entropy = lse - row_dot / row_sum

    label = tl.load(labels_ptr + token).to(tl.int32)
    valid = label >= 0
    # a label outside [0, V) that is not the ignore index (value checks switched off) read no target
    # logit: poison the token's outputs visibly, as the native kernels do, rather than read a stale one
    out_of_range = (label != -100) & ((label < 0) | (label >= vocab_size))
    valid = valid & ~out_of_range
    logprob = tl.where(valid, tl.load(target_ptr + token) - lse, 0.0)
    # `coef_ptr`: pg_coef_t (LOSS_LOGPROB) or the aggregation scale s_t (LOSS_CLIPPED_SURROGATE);
    # `kl_ptr`: the 0-d kl_weight, or the per-token KL scale k_t
    coef = tl.load(coef_ptr + token)
    first = slice_id == 0
    if LOSS_MODE == 0:  # LOSS_LOGPROB
        loss = -coef * logprob
        grad = -coef
        if HAS_REF:
            kl = tl.load(kl_ptr)
    else:  # LOSS_CLIPPED_SURROGATE
        # Off action tokens lp is 0 and old_t arbitrary, so r may overflow there: every use is masked.
        advantage = tl.load(advantages_ptr + token)
        ratio = tl.exp(logprob - tl.load(old_logprobs_ptr + token))
        unclipped = ratio * advantage
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * advantage
        use_unclipped = unclipped <= clipped  # ties take the unclipped branch, as the torch backend
        loss = -coef * tl.minimum(unclipped, clipped)
        grad = tl.where(use_unclipped, -coef * unclipped, 0.0)  # d(r A)/dlp = r A
        tl.store(ratio_ptr + token, tl.where(valid, ratio, 0.0), mask=first)
        # the clip is active where the unclipped term is not the minimum (strictly larger)
        tl.store(clipped_ptr + token, tl.where(valid, tl.where(use_unclipped, 0.0, 1.0), 0.0), mask=first)
        if HAS_REF:
            kl = tl.load(kl_ptr + token)
    if HAS_REF:  # k3 estimator of KL(pi || ref)
        delta = tl.load(ref_ptr + token) - logprob
        kl_ratio = tl.exp(delta)
        loss += kl * (kl_ratio - delta - 1.0)
        grad += kl * (1.0 - kl_ratio)
    loss = tl.where(valid, loss, 0.0)
    grad = tl.where(valid, grad, 0.0)
    loss = tl.where(out_of_range, float("nan"), loss)
    logprob = tl.where(out_of_range, float("nan"), logprob)
    entropy = tl.where(out_of_range, float("nan"), entropy)
    tl.store(logprobs_ptr + token, logprob, mask=first)
    tl.store(entropy_ptr + token, tl.where(valid | out_of_range, entropy, 0.0), mask=first)
    tl.store(token_loss_ptr + token, loss, mask=first)

    if WRITE_GRAD:
        scale = grad * inv_temperature * tl.load(grad_scale_ptr)
        # probabilities of the stored logits, normalised by the stored logits' own sum (see kernel 1)
        grad_lse = lse
        if STORED_SUM:
            stored_sum = tl.sum(tl.load(part_stored_sum_ptr + part, mask=s_mask, other=0.0) * weights, axis=0)
            grad_lse = row_max + tl.log(stored_sum)
        row_ptr = logits_ptr + token.to(tl.int64) * stride_logits
        v_begin = slice_id * vocab_per_program
        v_end = tl.minimum(v_begin + vocab_per_program, vocab_size)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < v_end
            z = tl.load(row_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
            onehot = tl.where(offs_v == label, 1.0, 0.0)
            dz = scale * (onehot - tl.exp(z - grad_lse))
            tl.store(row_ptr + offs_v, cast_rounded(dz, logits_ptr.dtype.element_ty, INTERPRETED), mask=v_mask)


# ---------------------------------------------------------------------------------------------
# host launchers


@dataclass(frozen=True)
class ClippedSurrogate:
    """What selects `LOSS_CLIPPED_SURROGATE`: the mode's own per-token inputs and statistics outputs.

    `advantages`, `old_logprobs`: `[T]` fp32 inputs. `ratio`, `clipped`: `[T]` fp32 outputs written by
    the softmax-gradient kernel (`r_t`, and 1.0 where the clipped term is strictly the minimum; both 0
    off action tokens). In this mode the op's `coef` is the aggregation scale `s [T]` and its `kl`
    the per-token KL scale `k [T]`.
    """

    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    clip_low: float
    clip_high: float

    def chunk(self, part: slice) -> "ClippedSurrogate":
        """The per-token tensors of tokens `part` (views: the kernel writes through them)."""
        return replace(self, advantages=self.advantages[part], old_logprobs=self.old_logprobs[part],
                       ratio=self.ratio[part], clipped=self.clipped[part])


class ChunkBuffers:
    """The per-chunk work space, allocated once per call and reused by every chunk."""

    def __init__(self, chunk_tokens, vocab_size, hidden_size, dtype, device, device_info_: DeviceInfo):
        # A shorter chunk (the last one) has fewer token blocks and so more vocabulary splits: size the
        # partials for the most splits any chunk size can take, i.e. for a single token block.
        max_splits = 1
        for tokens in (1, chunk_tokens):
            tile = configs.logits_tile(device_info_, dtype, tokens, hidden_size, vocab_size)
            num_vocab_blocks = cdiv(vocab_size, tile.block_n)
            per_split = configs.vocab_blocks_per_split(device_info_, 1, num_vocab_blocks)
            max_splits = max(max_splits, cdiv(num_vocab_blocks, per_split))
        self.logits = torch.empty((chunk_tokens, vocab_size), dtype=dtype, device=device)
        # (max, sum, dot, sum over the stored logits) per split; the last only for 16-bit buffers
        self.partials = torch.empty((4, max_splits, chunk_tokens), dtype=torch.float32, device=device)
        self.target = torch.zeros(chunk_tokens, dtype=torch.float32, device=device)


def plan_logits_lse(hidden, weight, labels, buffers: ChunkBuffers, temperature, device: DeviceInfo, *,
                    store_logits: bool = True) -> KernelLaunch:
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    tile = configs.logits_tile(device, hidden.dtype, num_tokens, hidden_size, vocab_size)
    num_token_blocks = cdiv(num_tokens, tile.block_m)
    num_vocab_blocks = cdiv(vocab_size, tile.block_n)
    per_split = configs.vocab_blocks_per_split(device, num_token_blocks, num_vocab_blocks)
    num_splits = cdiv(num_vocab_blocks, per_split)
    logits = buffers.logits[:num_tokens]
    part_max, part_sum, part_dot, part_stored_sum = buffers.partials
    if num_splits > part_max.shape[0] or num_tokens > part_max.shape[1]:
        raise RuntimeError(f"oreal_kernels: chunk work space too small ({tuple(part_max.shape)}) for "
                           f"{num_splits} splits x {num_tokens} tokens")
    args = dict(
        hidden_ptr=hidden, weight_ptr=weight, labels_ptr=labels, logits_ptr=logits,
        part_max_ptr=part_max, part_sum_ptr=part_sum, part_dot_ptr=part_dot, part_stored_sum_ptr=part_stored_sum,
        target_ptr=buffers.target, num_tokens=num_tokens, vocab_size=vocab_size, hidden_size=hidden_size, blocks_per_split=per_split,
        stride_hidden=hidden.stride(0), stride_weight=weight.stride(0), stride_logits=logits.stride(0),
        stride_part=part_max.stride(0), inv_temperature=1.0 / temperature,
    )
    constexprs = dict(BLOCK_T=tile.block_m, BLOCK_V=tile.block_n, BLOCK_H=tile.block_k, INTERPRETED=INTERPRET,
                      DOT_PRECISION=dot_precision(hidden.dtype, device), STORE_LOGITS=store_logits,
                      STORED_SUM=store_logits and logits.dtype != torch.float32)
    return KernelLaunch("logits_lse_fwd", _logits_lse_fwd_kernel, (num_token_blocks * num_splits,), args,
                        constexprs, tile.num_warps, tile.num_stages)


def plan_softmax_grad(labels, pg_coef, ref_logprobs, kl_weight, grad_scale, logprobs, entropy, token_loss,
                      buffers: ChunkBuffers, num_splits, temperature, device: DeviceInfo, *,
                      write_grad: bool, surrogate: ClippedSurrogate | None = None) -> KernelLaunch:
    """Kernel 2 in the OREAL mode, or in the clipped-surrogate mode when `surrogate` is given (then
    `pg_coef` is the token scale `s` and `kl_weight` the per-token KL scale `k`)."""
    num_tokens = labels.shape[0]
    logits = buffers.logits[:num_tokens]
    vocab_size = logits.shape[1]
    part_max, part_sum, part_dot, part_stored_sum = buffers.partials
    block_v, num_warps = configs.softmax_grad_block(device)
    programs_per_row = configs.softmax_grad_vocab_programs(device, num_tokens, vocab_size, block_v)
    vocab_per_program = cdiv(cdiv(vocab_size, programs_per_row), block_v) * block_v
    programs_per_row = cdiv(vocab_size, vocab_per_program) if write_grad else 1
    has_ref = ref_logprobs is not None
    # a mode's unused pointers get a tensor of the right dtype that the kernel never touches
    mode_args = (dict(advantages_ptr=pg_coef, old_logprobs_ptr=pg_coef, ratio_ptr=token_loss, clipped_ptr=token_loss,
                      ratio_low=1.0, ratio_high=1.0) if surrogate is None else
                 dict(advantages_ptr=surrogate.advantages, old_logprobs_ptr=surrogate.old_logprobs,
                      ratio_ptr=surrogate.ratio, clipped_ptr=surrogate.clipped,
                      ratio_low=1.0 - surrogate.clip_low, ratio_high=1.0 + surrogate.clip_high))
    args = dict(
        logits_ptr=logits, part_max_ptr=part_max, part_sum_ptr=part_sum, part_dot_ptr=part_dot,
        part_stored_sum_ptr=part_stored_sum, target_ptr=buffers.target, labels_ptr=labels, coef_ptr=pg_coef,
        ref_ptr=ref_logprobs if has_ref else pg_coef, kl_ptr=kl_weight, grad_scale_ptr=grad_scale,
        logprobs_ptr=logprobs, entropy_ptr=entropy, token_loss_ptr=token_loss,
        vocab_size=vocab_size, num_splits=num_splits, vocab_per_program=vocab_per_program,
        stride_logits=logits.stride(0), stride_part=part_max.stride(0), inv_temperature=1.0 / temperature,
        **mode_args,
    )
    loss_mode = LOSS_LOGPROB if surrogate is None else LOSS_CLIPPED_SURROGATE
    constexprs = dict(HAS_REF=has_ref, LOSS_MODE=loss_mode, WRITE_GRAD=write_grad,
                      BLOCK_SPLITS=max(2, next_power_of_2(num_splits)), BLOCK_V=block_v, INTERPRETED=INTERPRET,
                      STORED_SUM=write_grad and logits.dtype != torch.float32)
    return KernelLaunch("softmax_grad", _softmax_grad_kernel, (num_tokens, programs_per_row), args, constexprs,
                        num_warps, 1)


def gradient_scale(pg_coef, kl_weight, temperature):
    """A power of two `sigma` with `|dz| * sigma <= ~1`, as a 0-d device tensor (no host sync).

    `|g_t| <= |pg_coef_t| + kl_weight |1 - exp(d_t)|`; with the KL ratio near 1 the bound is
    `max |pg_coef| + kl_weight`, divided by the temperature for `dz`.
    """
    bound = (pg_coef.abs().amax() + kl_weight) / temperature
    return torch.exp2(-torch.ceil(torch.log2(bound.clamp(min=2.0 ** -60))))


def surrogate_gradient_scale(token_scale, surrogate: ClippedSurrogate, kl_scale, has_ref, temperature):
    """`gradient_scale` of the clipped surrogate: `|g_t| <= |s_t A_t| r_t + k_t |1 - exp(d_t)|`.

    Where the unclipped term is the minimum, `r_t <= 1 + eps_high` for `A_t > 0`; for `A_t < 0` the
    ratio has no upper bound, so the bound takes `r_t ~ 1 + eps_high` for every token (as the KL term
    takes `exp(d_t) ~ 1`): a looser bound would throw away fp16 range for every batch. A token whose
    ratio is `R (1 + eps_high)` stores `|dz|` up to about `R`: fp16 overflows only beyond
    `r ~ 6.5e4 (1 + eps_high)` (`lp - old > 11`), where the step is broken anyway; bf16 and fp32 have
    fp32's range.
    """
    pg_bound = (token_scale * surrogate.advantages).abs() * (1.0 + surrogate.clip_high)
    kl_bound = kl_scale.abs().amax() if has_ref else torch.zeros((), dtype=torch.float32, device=kl_scale.device)
    return gradient_scale(pg_bound, kl_bound, temperature)


def check_inputs(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, surrogate=None):
    """The checks this backend needs beyond `oreal.ops.validation`: dtypes it runs and one device."""
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden: dtype {hidden.dtype} is not supported by the Triton backend "
                         "(bf16, fp16 or fp32; use backend='torch' for float64)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)} "
                         "(expected hidden [T, H] and weight [V, H])")
    for name, tensor in (("labels", labels), ("pg_coef", pg_coef), ("ref_logprobs", ref_logprobs),
                         ("kl_weight", kl_weight), ("weight", weight)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name}: is on {tensor.device}, but hidden is on {hidden.device}")
    if pg_coef.dtype != torch.float32 or (ref_logprobs is not None and ref_logprobs.dtype != torch.float32):
        raise ValueError("pg_coef and ref_logprobs: expected float32")
    if surrogate is not None:
        num_tokens = hidden.shape[0]
        for name, tensor in (("token_scale", pg_coef), ("kl_scale", kl_weight), ("ref_logprobs", ref_logprobs),
                             ("advantages", surrogate.advantages), ("old_logprobs", surrogate.old_logprobs)):
            if tensor is None:
                continue
            if tensor.device != hidden.device:
                raise ValueError(f"{name}: is on {tensor.device}, but hidden is on {hidden.device}")
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != (num_tokens,):
                raise ValueError(f"{name}: expected a float32 tensor of shape ({num_tokens},), got "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")


def _row_major(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_launches(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, sigma, outputs, grads, buffers,
                   temperature, device: DeviceInfo, *, first_chunk: bool,
                   surrogate: ClippedSurrogate | None = None) -> list[KernelLaunch]:
    """The four launches of one chunk, in order (the module docstring's steps 1-4).

    `hidden`, `labels`, `pg_coef`, `ref_logprobs` and the `outputs` (logprobs, entropy, token_loss)
    are the chunk's slices; `grads` is (grad_hidden slice or None, grad_weight or None), both
    receiving `sigma` times the gradient. With `surrogate` (the chunk's slices) kernel 2 runs the
    clipped surrogate: `pg_coef` is then the token scale and `kl_weight` the chunk's KL scales.
    """
    grad_hidden, grad_weight = grads
    write_grad = grad_hidden is not None or grad_weight is not None
    fwd = plan_logits_lse(hidden, weight, labels, buffers, temperature, device, store_logits=write_grad)
    num_splits = fwd.grid[0] // cdiv(hidden.shape[0], fwd.constexprs["BLOCK_T"])
    launches = [fwd, plan_softmax_grad(labels, pg_coef, ref_logprobs, kl_weight, sigma, *outputs, buffers,
                                       num_splits, temperature, device, write_grad=write_grad,
                                       surrogate=surrogate)]
    dz = buffers.logits[:hidden.shape[0]]
    if grad_hidden is not None:
        launches.append(plan_matmul_into("grad_hidden", dz, weight, grad_hidden, device, accumulate=False))
    if grad_weight is not None:
        launches.append(plan_matmul_into("grad_weight", dz.T, hidden, grad_weight, device,
                                         accumulate=not first_chunk))
    return launches


class _LinearLogprobLoss(torch.autograd.Function):
    """Both loss modes: `surrogate` None runs OREAL's, a `ClippedSurrogate` the clipped surrogate (its
    ratio and clip-flag outputs are written in place; everything else is shared)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, surrogate, temperature, chunk_size,
                grad_enabled):
        check_inputs(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, surrogate)
        device = device_info(hidden.device)
        hidden, weight = _row_major(hidden), _row_major(weight)
        labels, pg_coef = labels.contiguous(), pg_coef.contiguous()
        ref_logprobs = None if ref_logprobs is None else ref_logprobs.contiguous()
        # OREAL: one 0-d KL weight; clipped surrogate: one KL scale per token
        kl_weight = kl_weight.reshape(()).float() if surrogate is None else kl_weight.contiguous()
        num_tokens, hidden_size = hidden.shape
        vocab_size = weight.shape[0]

        logprobs = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        token_loss = torch.zeros_like(logprobs)
        # forward() always runs with grad mode off; `grad_enabled` is the caller's mode, so that
        # log-probs computed under torch.no_grad() skip the gradient work (2/3 of the FLOPs)
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        # the first chunk's matmul overwrites the weight gradient: no zero fill unless there is no chunk
        alloc = torch.empty if num_tokens else torch.zeros
        grad_weight = (alloc(weight.shape, dtype=torch.float32, device=weight.device)
                       if grad_enabled and ctx.needs_input_grad[1] else None)
        if num_tokens:
            chunk = chunk_size or configs.default_chunk_tokens(num_tokens, vocab_size, hidden.dtype)
            chunk = max(1, min(int(chunk), num_tokens))
            buffers = ChunkBuffers(chunk, vocab_size, hidden_size, hidden.dtype, hidden.device, device)
            if surrogate is None:
                sigma = gradient_scale(pg_coef, kl_weight, temperature)
            else:
                sigma = surrogate_gradient_scale(pg_coef, surrogate, kl_weight, ref_logprobs is not None, temperature)
            for start in range(0, num_tokens, chunk):
                part = slice(start, min(start + chunk, num_tokens))
                for launch in chunk_launches(
                        hidden[part], weight, labels[part], pg_coef[part],
                        None if ref_logprobs is None else ref_logprobs[part],
                        kl_weight if surrogate is None else kl_weight[part], sigma,
                        (logprobs[part], entropy[part], token_loss[part]),
                        (None if grad_hidden is None else grad_hidden[part], grad_weight), buffers,
                        temperature, device, first_chunk=start == 0,
                        surrogate=None if surrogate is None else surrogate.chunk(part)):
                    launch.run()
        else:
            sigma = torch.ones((), dtype=torch.float32, device=hidden.device)
        loss = token_loss.sum()
        ctx.save_for_backward(grad_hidden, grad_weight, sigma)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        grad_hidden, grad_weight, sigma = ctx.saved_tensors
        factor = grad_loss.float() / sigma  # applied in fp32: the product may leave the 16-bit range
        # Eager: the saved gradients belong to this graph alone, so scale them in place (no second fp32
        # [V, H]; a second backward through the graph is then refused by autograd's version check).
        in_place = not torch.compiler.is_compiling() and all(
            type(t) is torch.Tensor for t in (grad_loss, grad_hidden, grad_weight) if t is not None)
        if grad_hidden is not None:
            grad_hidden = _scaled(grad_hidden, factor, in_place)
        if grad_weight is not None:
            grad_weight = _scaled(grad_weight, factor, in_place).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


_RESCALE_BLOCK = 1 << 24  # elements per fp32 temporary when a 16-bit gradient is rescaled in place


def _scaled(grad: torch.Tensor, factor: torch.Tensor, in_place: bool) -> torch.Tensor:
    """`grad * factor` (fp32 0-d), multiplied in fp32 and returned in grad's dtype; in place when allowed."""
    if grad.dtype == torch.float32:
        return grad.mul_(factor) if in_place else grad * factor
    if not in_place:
        return (grad.float() * factor).to(grad.dtype)
    for block in grad.view(-1).split(_RESCALE_BLOCK):
        block.copy_(block.float() * factor)
    return grad


def linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature=1.0,
                        chunk_size=None):
    """Token-weighted log-prob loss with fused gradients (see the module docstring)."""
    if not isinstance(kl_weight, torch.Tensor):
        kl_weight = torch.tensor(float(kl_weight), dtype=torch.float32, device=hidden.device)
    return _LinearLogprobLoss.apply(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, None,
                                    float(temperature), chunk_size, torch.is_grad_enabled())
