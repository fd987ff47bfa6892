"""Block sizes, warps, stages and work splits, picked by a small table keyed on architecture and shape.

No `@triton.autotune`: under the interpreter it fails with more than one config, a first call that
benchmarks configs would stall a training step, and the ahead-of-time report must know the exact
config a launch uses. The table below is the whole policy; README.md explains the choices.

Hopper (sm_90) tensor-core tiles: `tl.dot` becomes `wgmma` (HGMMA) when the tile's M is a
multiple of 64 per warpgroup, K a multiple of 16, operands are staged in shared memory by the
software pipeliner (num_stages >= 3) and num_warps is 4 or 8. 128x128x64 bf16 with 4 stages uses
4 * (128*64 + 64*128) * 2 B = 128 KiB of the 227 KiB shared memory and leaves room for the
epilogue; the fp32 accumulator is 64 registers per thread at 8 warps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._runtime import DeviceInfo, cdiv, next_power_of_2


@dataclass(frozen=True)
class TileConfig:
    """A matmul tile: `block_m x block_n` outputs, `block_k` reduction step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def _clamp_p2(n: int, low: int, high: int) -> int:
    return max(low, min(high, next_power_of_2(n)))


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


# Shared memory kept free beside the pipeline's operand stages (layout conversions, reductions).
SMEM_RESERVE_BYTES = 4 << 10


def stage_bytes(tile: TileConfig, dtype: torch.dtype) -> int:
    """Shared memory of the software pipeline: `num_stages` copies of one A and one B operand tile."""
    element = torch.empty((), dtype=dtype).element_size()
    return tile.num_stages * (tile.block_m * tile.block_k + tile.block_k * tile.block_n) * element


def fit_shared_memory(tile: TileConfig, dtype: torch.dtype, device: DeviceInfo) -> TileConfig:
    """`tile`, with fewer stages or a shorter K step where the device's shared memory is smaller than
    the tile was chosen for (sm_120: ~99 KiB; sm_86/89: ~99 KiB; Hopper: 227 KiB). Shapes are kept:
    deeper K steps go before a third stage, a third stage before the fourth, two stages are the floor."""
    budget = device.shared_memory - SMEM_RESERVE_BYTES
    candidates = [tile]
    for block_k, stages in ((tile.block_k, 3), (32, tile.num_stages), (32, 3), (32, 2), (16, 2)):
        if block_k <= tile.block_k and stages <= tile.num_stages:
            candidates.append(replace(tile, block_k=block_k, num_stages=stages))
    for candidate in candidates:
        if stage_bytes(candidate, dtype) <= budget:
            return candidate
    return candidates[-1]


def _gpu_tile(device: DeviceInfo, dtype: torch.dtype, m: int) -> TileConfig:
    small_m = m <= 64
    if _is_16bit(dtype):
        if device.arch >= 90:  # wgmma (sm_90): 64 rows per warpgroup; Blackwell takes the same shapes
            tile = TileConfig(64 if small_m else 128, 128, 64, 4 if small_m else 8, 4)
        elif device.arch >= 80:  # mma.sync; 8 warps keep the 128x128 fp32 accumulator at 64 registers
            tile = TileConfig(64 if small_m else 128, 128, 32, 4 if small_m else 8, 4)
        else:
            tile = TileConfig(64, 64, 32, 4, 2)
    else:
        # fp32: with torch's default "highest" precision tl.dot runs on FMA units, whose operand
        # fragments cost registers: 64x64 tiles at 8 warps stay far from spilling on sm_80 and sm_90
        tile = TileConfig(64, 64, 32, 8, 3)
    return fit_shared_memory(tile, dtype, device)


# ---- fused logits + log-sum-exp kernel: M = tokens of the chunk, N = vocabulary, K = hidden ----

# Enough programs that the last, partial wave wastes at most a few percent of the GPU ...
WAVES_PER_LAUNCH = 16
# ... but no more vocabulary splits than this: every program of the softmax-gradient kernel
# merges all of a token's split partials, so their number must stay small next to V.
MAX_VOCAB_SPLITS = 512


# The interpreter's cost is per program and per op, not per element: it gets few, large blocks,
# sized so that the tests still cross every boundary (several tiles, splits and K steps).

def logits_tile(device: DeviceInfo, dtype: torch.dtype, num_tokens: int, hidden_size: int,
                vocab_size: int) -> TileConfig:
    if device.interpreted:
        return TileConfig(_clamp_p2(num_tokens, 16, 64), _clamp_p2(cdiv(vocab_size, 6), 16, 2048),
                          _clamp_p2(hidden_size, 16, 128), 4, 1)
    if not _is_16bit(dtype) or device.arch < 80:
        return _gpu_tile(device, dtype, num_tokens)
    # 64 vocabulary columns, not 128: the online-softmax epilogue holds several tile-sized fp32
    # temporaries, and 128-wide tiles sat at 224-255 registers (spilling for small chunks). At
    # 64 wide the kernel needs 96 KiB of shared memory and ~180 registers on sm_90 with the sum over
    # the stored 16-bit logits (~128 without it, when two CTAs shared an SM).
    small_m = num_tokens <= 64
    block_k = 64 if device.arch >= 90 else 32
    return fit_shared_memory(TileConfig(64 if small_m else 128, 64, block_k, 4 if small_m else 8, 4), dtype, device)


def vocab_blocks_per_split(device: DeviceInfo, num_token_blocks: int, num_vocab_blocks: int) -> int:
    """How many consecutive vocabulary blocks one program of the logits kernel walks through.

    One program per (token block, vocabulary block) fills the GPU best but writes one
    (max, sum, dot) partial per block; walking a few blocks per program keeps
    WAVES_PER_LAUNCH waves of programs and fewer partials.
    """
    if device.interpreted:  # at most 3 splits, so that splits both walk and merge several blocks
        return cdiv(num_vocab_blocks, 3)
    target_programs = WAVES_PER_LAUNCH * device.sm_count
    per_split = max(1, (num_token_blocks * num_vocab_blocks) // target_programs)
    return max(per_split, cdiv(num_vocab_blocks, MAX_VOCAB_SPLITS))


# ---- row-wise softmax-gradient kernel: one program per (token, vocabulary slice) ----

def softmax_grad_block(device: DeviceInfo) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 2048 elements per step is 16 per thread at 4 warps."""
    if device.interpreted:
        return 4096, 4
    return 2048, 4


def softmax_grad_vocab_programs(device: DeviceInfo, num_tokens: int, vocab_size: int, block_v: int) -> int:
    """Programs per token row: enough for 4 waves when the chunk has few tokens."""
    wanted = cdiv(4 * device.sm_count, max(num_tokens, 1))
    return max(1, min(wanted, cdiv(vocab_size, block_v)))


# ---- gradient matmuls ----

def matmul_tile(device: DeviceInfo, dtype: torch.dtype, m: int, n: int, k: int) -> TileConfig:
    if device.interpreted:
        return TileConfig(_clamp_p2(cdiv(m, 8), 16, 4096), _clamp_p2(cdiv(n, 2), 16, 256), _clamp_p2(k, 16, 512),
                          4, 1, group_m=4)
    return _gpu_tile(device, dtype, m)


def matmul_split_k(device: DeviceInfo, tile: TileConfig, m: int, n: int, k: int) -> int:
    """Split the reduction when the output tiles alone cannot fill the GPU (grad_hidden of a small
    chunk: M = a few tokens, K = the vocabulary). Each split keeps at least 8 K-steps."""
    tiles = cdiv(m, tile.block_m) * cdiv(n, tile.block_n)
    if tiles >= device.sm_count:
        return 1
    wanted = cdiv(2 * device.sm_count, tiles)
    return max(1, min(wanted, k // (8 * tile.block_k)))


# ---- token-RM weights scan ----

def scan_block(device: DeviceInfo) -> tuple[int, int]:
    """(BLOCK, num_warps) of the segmented scan: one program per sequence walks it BLOCK at a time."""
    return (1024, 4)


# ---- chunking ----

# Bytes of the per-chunk logit buffer (the only O(chunk x V) allocation). Every chunk but the first
# reads and writes the whole fp32 weight gradient (8 V H bytes: 4.4 GB at Qwen2.5-7B's shape), so
# fewer, larger chunks cut that traffic: 1 GiB gives 3.4k-token chunks at V = 152k in bf16 (5 per
# 16k-token batch: 19.6 GB of read-modify-write instead of 41 GB with 512 MiB chunks).
LOGITS_BUDGET_BYTES = 1 << 30


def default_chunk_tokens(num_tokens: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as fit the logit budget, the batch split into chunks of equal size
    (no short last chunk), a multiple of 128 when that is possible."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    cap = max(1, LOGITS_BUDGET_BYTES // (vocab_size * element_bytes))
    if num_tokens <= cap:
        return max(1, num_tokens)
    chunk = cdiv(num_tokens, cdiv(num_tokens, cap))
    rounded = cdiv(chunk, 128) * 128  # whole 128-token tiles, when that still fits the budget
    return max(1, rounded if rounded <= cap else chunk)
