"""OREAL's token-RM importance weights `w_t` as one segmented-scan Triton kernel.

Same semantics as `oreal.ops.token_weights` (the torch version): for action token t of sequence i,
`c_t` is the running mean of the raw token-RM scores over the action tokens of i up to t,
`q_t = sigmoid(c_t)`, `w_t = clamp(2 q_t - 1, 0, 1)` if i is positive, `clamp(1 - 2 q_t, 0, 1)` if
negative, and 0 at label -100.

One program per sequence walks it in blocks of BLOCK tokens: `tl.cumsum` scans a block and a
carried (sum, count) pair links the blocks, so a sequence of any length is one pass over its
tokens with no cross-program communication. The scan accumulates in fp32 from the sequence start
(not a global prefix minus an offset), so nothing cancels however long the packed row is.
Length-0 sequences run no iteration; all-ignored sequences write zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._runtime import DeviceInfo, KernelLaunch, device_info


@triton.jit
def _token_rm_weights_kernel(
    scores_ptr, labels_ptr, cu_seqlens_ptr, positive_ptr, out_ptr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    # w = clamp(sign * (2 q - 1), 0, 1) with sign +1 for positive sequences, -1 for negative ones
    sign = tl.where(tl.load(positive_ptr + seq) != 0, 1.0, -1.0)
    carried_sum = tl.zeros((), tl.float32)
    carried_count = tl.zeros((), tl.float32)
    for block_start in range(start, end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        inside = offs < end
        labels = tl.load(labels_ptr + offs, mask=inside, other=-100)
        action = labels != -100
        scores = tl.load(scores_ptr + offs, mask=inside & action, other=0.0).to(tl.float32)
        counts = action.to(tl.float32)
        running_sum = carried_sum + tl.cumsum(scores, axis=0)
        running_count = carried_count + tl.cumsum(counts, axis=0)
        mean = running_sum / tl.maximum(running_count, 1.0)
        q = tl.sigmoid(mean)
        weight = tl.minimum(tl.maximum(sign * (2.0 * q - 1.0), 0.0), 1.0)
        tl.store(out_ptr + offs, tl.where(action, weight, 0.0), mask=inside)
        carried_sum += tl.sum(scores, axis=0)
        carried_count += tl.sum(counts, axis=0)


def plan_token_rm_weights(rm_scores, labels, cu_seqlens, positive, out, device: DeviceInfo) -> KernelLaunch:
    block, num_warps = configs.scan_block(device)
    args = dict(scores_ptr=rm_scores, labels_ptr=labels, cu_seqlens_ptr=cu_seqlens, positive_ptr=positive,
                out_ptr=out)
    return KernelLaunch("token_rm_weights", _token_rm_weights_kernel, (cu_seqlens.numel() - 1,), args,
                        dict(BLOCK=block), num_warps, 1)


def token_rm_weights(rm_scores: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                     is_positive: torch.Tensor) -> torch.Tensor:
    """Per-token importance weights `w_t` `[T]` float32 (0 at non-action positions)."""
    if rm_scores.dtype == torch.float64:
        rm_scores = rm_scores.float()  # the scan accumulates in fp32 anyway
    if rm_scores.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"rm_scores: dtype {rm_scores.dtype} is not supported by the Triton backend "
                         "(bf16, fp16, fp32 or fp64)")
    for name, tensor in (("labels", labels), ("cu_seqlens", cu_seqlens), ("is_positive", is_positive)):
        if tensor.device != rm_scores.device:
            raise ValueError(f"{name}: is on {tensor.device}, but rm_scores is on {rm_scores.device}")
    device = device_info(rm_scores.device)
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=rm_scores.device)
    positive = is_positive.to(torch.int32).contiguous()  # bool pointers are awkward in Triton
    plan_token_rm_weights(rm_scores.contiguous(), labels.contiguous(), cu_seqlens.contiguous(), positive, out,
                          device).run()
    return out
