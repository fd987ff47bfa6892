"""Process group, device and FSDP2 sharding for the trainer.

`fully_shard` is applied per transformer block and then on the root module that owns the
embeddings, final norm and lm_head: the root's forward unshards those, which is why the trainer
runs the fused loss inside a root module's forward (the lm_head weight is then whole). On GPU the
mixed-precision policy computes in bf16 and reduces gradients in fp32; on CPU everything is fp32.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a single process works without torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--train.device cuda: no CUDA device is visible; use --train.device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" not in os.environ:  # plain `python -m oreal.train`: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        backend = "cuda:nccl,cpu:gloo"  # gloo for the object collectives that carry Python data
    else:
        torch_device = torch.device("cpu")
        backend = "gloo"
        from oreal.cpu_threads import use_threads
        from oreal.runtime.budget import rank_threads

        use_threads(rank_threads())  # torchrun's default is 1 whatever the machine; share its cores
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(torch_device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=torch_device, mesh=mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (or of a module wrapping one): the FSDP2 units."""
    for name, child in module.named_modules():
        if name.endswith("layers") and isinstance(child, nn.ModuleList) and len(child) > 0:
            return list(child)
    raise ValueError(f"{type(module).__name__}: found no ModuleList of transformer blocks named '*layers'")


def shard(root: nn.Module, ctx: DistContext, *, param_dtype: torch.dtype | None,
          reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` on every transformer block, then on `root`. Returns `root` (now an FSDPModule)."""
    if ctx.device.type == "cuda" and param_dtype is not None and param_dtype != torch.float32:
        block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        block_mp = MixedPrecisionPolicy()  # CPU: fp32 compute and reduction
    # The root's inputs are a PackedBatch and loss inputs (advantages, token counts, reference log-probs):
    # they stay in fp32 (a count of a million tokens is not representable in bf16).
    root_mp = MixedPrecisionPolicy(param_dtype=block_mp.param_dtype, reduce_dtype=block_mp.reduce_dtype,
                                   cast_forward_inputs=False)
    for block in transformer_blocks(root):
        fully_shard(block, mesh=ctx.mesh, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=ctx.mesh, mp_policy=root_mp, reshard_after_forward=reshard_after_forward)
    return root


def all_reduce_sum(values: list[float] | torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small vector over ranks in one collective (float64, so that token counts stay exact)."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=ctx.device).clone()
    if ctx.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


@contextmanager
def gathered_within_step(module: nn.Module, enabled: bool):
    """Around one update's micro-batches: FSDP2 gathers each block's parameters once, not twice per micro-batch.

    Yields `before(last)`, to call before each micro-batch's forward. When `enabled`, parameters gathered
    by the first forward stay gathered through every forward and backward of the update
    (`reshard_after_forward` and `reshard_after_backward` off), gradients accumulate unreduced, and the
    last micro-batch's backward reduce-scatters them once; on exit everything is resharded, so outside
    the block the module is exactly as FSDP2 left it. Costs the whole model's parameters and gradients in
    memory for the duration: `oreal.runtime.budget.keep_unsharded` decides when that is small. Every rank
    must pass the same `enabled` and call `before` as often (the packing gives every rank as many
    micro-batches).
    """
    if not enabled or not isinstance(module, FSDPModule):
        yield lambda last: None
        return

    def before(last: bool) -> None:
        module.set_requires_gradient_sync(last)
        module.set_reshard_after_backward(last)

    # FSDP2 keeps the root's parameters gathered after its forward (its own heuristic) and reshards the blocks':
    # remember each unit's setting, so that leaving restores exactly that.
    states = [m._get_fsdp_state() for m in module.modules() if isinstance(m, FSDPModule)]
    saved = [(state, state._auto_reshard_after_forward,
              [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]) for state in states]
    module.set_reshard_after_forward(False)
    try:
        yield before
    finally:
        module.set_requires_gradient_sync(True)
        module.set_reshard_after_backward(True)
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info
        module.reshard()
