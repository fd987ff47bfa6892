"""`C (+)= A @ B` on tensor cores, fp32 accumulation, for the two gradient matmuls.

    grad_hidden[chunk]  = dz @ W        A = dz [C, V] (K-major), B = W [V, H]
    grad_weight        += dz^T @ h      A = dz^T (a transposed view), B = h [C, H]

Why a Triton matmul and not `torch.matmul`: the weight gradient is accumulated over chunks in an
fp32 buffer while its operands are bf16/fp16. cuBLAS through torch would need either an fp32 copy
of the operands (an fp32 GEMM, no bf16 tensor cores) or a bf16 product plus a separate fp32 add
(an extra `V x H` write and read per chunk, and the product rounded to bf16). Here the product
stays in fp32 registers and is added to the buffer in the epilogue. Split-K (fp32 partials, summed
by one torch reduction on the device) fills the GPU when the output has few tiles. On sm_90a,
bf16/fp16 tiles compile to `wgmma` (HGMMA), checked by tests/kernels/test_triton_aot.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._runtime import INTERPRET, DeviceInfo, KernelLaunch, cdiv, dot_precision
from .rounding import cast_rounded


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_csplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr, INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-tiles share each column of B while it is hot in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_size
    pid_n = (pid % pids_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped row/column indices keep the loads unmasked along M and N (results are masked at the store).
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0
        a = tl.load(a_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0.0)
        if INTERPRETED:  # the interpreter multiplies raw bf16 bits: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (c_ptr + pid_k.to(tl.int64) * stride_csplit + offs_m[:, None].to(tl.int64) * stride_cm
              + offs_n[None, :].to(tl.int64) * stride_cn)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, cast_rounded(acc, c_ptr.dtype.element_ty, INTERPRETED), mask=c_mask)


def _split_reduction(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K per split, a multiple of block_k; number of non-empty splits)."""
    k_per_split = max(block_k, cdiv(cdiv(k, split_k), block_k) * block_k)
    return k_per_split, max(1, cdiv(k, k_per_split))


def plan_matmul(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, device: DeviceInfo, *,
                accumulate: bool, split_k: int = 1, then=None) -> KernelLaunch:
    """The launch computing `out (+)= a @ b`; with `split_k > 1`, `out` is `[split_k, M, N]` fp32
    partials for the caller to sum (and `accumulate` must be False)."""
    m, k = a.shape
    n = b.shape[1]
    tile = configs.matmul_tile(device, a.dtype, m, n, k)
    k_per_split, split_k = _split_reduction(k, split_k, tile.block_k)
    out_2d = out[0] if out.dim() == 3 else out
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=out, M=m, N=n, K=k, k_per_split=k_per_split,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cm=out_2d.stride(0), stride_cn=out_2d.stride(1),
        stride_csplit=out.stride(0) if out.dim() == 3 else 0,
    )
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
                      ACCUMULATE=accumulate, INTERPRETED=INTERPRET, DOT_PRECISION=dot_precision(a.dtype, device))
    grid = (cdiv(m, tile.block_m) * cdiv(n, tile.block_n), split_k)
    return KernelLaunch(name, _matmul_kernel, grid, args, constexprs, tile.num_warps, tile.num_stages, then)


def plan_matmul_into(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, device: DeviceInfo, *,
                     accumulate: bool) -> KernelLaunch:
    """`out (+)= a @ b`, splitting K through an fp32 partial buffer (summed into `out` by a torch
    reduction after the launch) when the output tiles alone would leave SMs idle."""
    m, k = a.shape
    n = b.shape[1]
    tile = configs.matmul_tile(device, a.dtype, m, n, k)
    split_k = 1 if accumulate else configs.matmul_split_k(device, tile, m, n, k)
    split_k = _split_reduction(k, split_k, tile.block_k)[1]
    if split_k == 1:
        return plan_matmul(name, a, b, out, device, accumulate=accumulate)
    partials = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)
    return plan_matmul(name, a, b, partials, device, accumulate=False, split_k=split_k,
                       then=lambda: out.copy_(partials.sum(0)))
