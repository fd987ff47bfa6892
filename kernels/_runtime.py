"""What every launcher needs: where kernels run, what the device is, and one launch record.

A launcher never calls a kernel directly. It builds a `KernelLaunch` (kernel, grid, runtime
arguments, constexprs, warps, stages) from its tensors and a `DeviceInfo`, then runs it. The same
records, built from `meta` tensors and an assumed device, are what `oreal_kernels.aot` hands to
`triton.compile`, so the ahead-of-time report compiles exactly what the launchers would launch.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

# `triton.jit` reads the same variable when the kernels are decorated, i.e. at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Streaming multiprocessors of the reference part of each architecture, for the
# ahead-of-time report (a live device reports its own count).
SM_COUNT_BY_ARCH = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}
# Shared memory one block may opt in to, per architecture (CUDA programming guide, "Compute
# capabilities"), for the ahead-of-time report; a live device reports its own. Tiles are sized from
# this number, not from the major version: sm_120 (consumer Blackwell) has ~99 KiB, not Hopper's 227.
SMEM_BYTES_BY_ARCH = {80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10, 100: 227 << 10, 120: 99 << 10}


@dataclass(frozen=True)
class DeviceInfo:
    """The facts the block-size heuristics depend on. `arch` is None under the interpreter.

    `smem_bytes`: the shared memory one block may use (opt-in maximum); None takes the architecture's
    figure from SMEM_BYTES_BY_ARCH (99 KiB for an unknown one: the smallest of the table)."""

    arch: int | None
    sm_count: int
    smem_bytes: int | None = None

    @property
    def shared_memory(self) -> int:
        if self.smem_bytes is not None:
            return self.smem_bytes
        return SMEM_BYTES_BY_ARCH.get(self.arch, 99 << 10)

    @property
    def interpreted(self) -> bool:
        return self.arch is None


INTERPRETER_DEVICE = DeviceInfo(arch=None, sm_count=4)


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)  # torch >= 2.4
    return DeviceInfo(arch=props.major * 10 + props.minor, sm_count=props.multi_processor_count,
                      smem_bytes=int(smem) if smem else None)


def device_info(device: torch.device) -> DeviceInfo:
    """The `DeviceInfo` for tensors on `device`; CPU tensors only run under the interpreter."""
    if device.type == "cuda":
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        raise ValueError("device_info: meta tensors have no device; pass a DeviceInfo explicitly")
    if not INTERPRET:
        raise ValueError(f"oreal_kernels: tensors are on {device.type}, but Triton kernels run on CUDA "
                         "tensors, or on CPU tensors only with TRITON_INTERPRET=1 set before "
                         "oreal_kernels is imported")
    return INTERPRETER_DEVICE


def dot_precision(dtype: torch.dtype, device: DeviceInfo) -> str:
    """`tl.dot`'s input precision: fp32 inputs follow torch's float32 matmul precision setting."""
    if device.interpreted:
        return "ieee"  # the interpreter multiplies in fp32 (numpy) whatever it is told
    if dtype != torch.float32:
        return "tf32"  # Triton's default; bf16/fp16 operands ignore it
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: `fn[grid](**args, **constexprs, num_warps=..., num_stages=...)`."""

    name: str
    fn: object
    grid: tuple[int, ...]
    args: dict = field(repr=False)
    constexprs: dict
    num_warps: int
    num_stages: int
    # host work that completes the launch (e.g. summing split-K partials); not part of AOT reports
    then: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def run(self) -> None:
        if all(size > 0 for size in self.grid):
            # Triton launches on the current CUDA device: make it the tensors' device
            device = next((v.device for v in self.args.values() if isinstance(v, torch.Tensor)), None)
            guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext()
            with guard:
                self.fn[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)
        if self.then is not None:
            self.then()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
