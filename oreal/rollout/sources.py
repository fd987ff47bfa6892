"""Where the bytes of each trainer parameter live across ranks (trainer side of a sync).

For every parameter the syncer needs to know which element range of the full (row-major,
flattened) tensor each rank holds, so rank 0 can receive exactly those ranges straight into
the bucket buffer and no rank ever materialises a full tensor:

- "replicated": plain tensors and all-Replicate DTensors; rank 0's copy is the full tensor.
- "shard0": FSDP2's default placement, Shard(0) along one mesh dimension (optionally with
  Replicate on the others, as in HSDP). The ranks on rank 0's line of that dimension hold
  consecutive row blocks, in mesh order; their sizes are all-gathered once, so uneven
  shards (rows not divisible by the world size) are handled exactly.
- "gather": anything else (Shard(d>0), strided or tensor-parallel layouts) falls back to
  `DTensor.full_tensor()` on every rank, one parameter at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None  # type: ignore[assignment]

# Wrapper segments that torch.compile, activation checkpointing, FSDP1 and DDP add to names.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def clean_name(name: str) -> str:
    """Parameter name as in the checkpoint: without wrapper segments or a DDP `module.` prefix."""
    name = _WRAPPER_SEGMENTS.sub(r"\1", name)
    return name.removeprefix("module.")


@dataclass
class ParamSource:
    name: str  # engine-facing name
    param: torch.Tensor  # the trainer's parameter (DTensor or plain tensor)
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str  # "replicated" | "shard0" | "gather"
    # (global rank, first element, end element) of the full flattened tensor, per holder.
    holders: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_flat(self) -> torch.Tensor:
        """This rank's part, flattened (a view, no copy)."""
        local = self.param.to_local() if DTensor is not None and isinstance(self.param, DTensor) else self.param
        return local.detach().reshape(-1)

    def my_range(self, rank: int) -> tuple[int, int] | None:
        for r, lo, hi in self.holders:
            if r == rank:
                return lo, hi
        return None


def _is_plain_shard0(placement) -> bool:
    return type(placement) is Shard and placement.dim == 0


def _classify(p: torch.Tensor) -> tuple[str, int | None]:
    if DTensor is None or not isinstance(p, DTensor):
        return "replicated", None
    placements = p.placements
    if all(isinstance(pl, Replicate) for pl in placements):
        return "replicated", None
    shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if len(shard_dims) == 1 and _is_plain_shard0(placements[shard_dims[0]]) and p.dim() > 0:
        return "shard0", shard_dims[0]
    return "gather", None


def describe_parameters(
    model: torch.nn.Module, *, rank: int, world_size: int,
    name_map: Callable[[str], str] | None = None,
) -> list[ParamSource]:
    """One ParamSource per (deduplicated) parameter; collective when world_size > 1."""
    named = list(model.named_parameters())  # tied weights appear once, under their first name
    classes = [_classify(p) for _, p in named]
    local_rows = [p.to_local().shape[0] if mode == "shard0" else 0 for (_, p), (mode, _) in zip(named, classes)]
    if world_size > 1:
        gathered: list[list[int]] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, local_rows)
    else:
        gathered = [local_rows]

    sources = []
    for i, ((raw_name, p), (mode, mesh_dim)) in enumerate(zip(named, classes)):
        name = clean_name(raw_name)
        if name_map is not None:
            name = name_map(name)
        shape = tuple(p.shape)
        numel = math.prod(shape)
        src = ParamSource(name, p, shape, p.dtype, mode)
        if mode == "replicated":
            src.holders = [(0, 0, numel)]
        elif mode == "shard0":
            mesh = p.device_mesh.mesh
            where = (mesh == 0).nonzero()
            if where.shape[0] != 1:
                raise ValueError(f"parameter {raw_name}: trainer rank 0 is not in its device mesh; "
                                 "the rank that owns the engine must hold a shard of every parameter")
            index = list(where[0].tolist())
            index[mesh_dim] = slice(None)
            line = mesh[tuple(index)].reshape(-1).tolist()
            row_numel = numel // shape[0] if shape[0] else 0
            start = 0
            for r in line:
                rows = gathered[r][i]
                src.holders.append((r, start * row_numel, (start + rows) * row_numel))
                start += rows
            if start != shape[0]:
                raise ValueError(f"parameter {raw_name}: shards along mesh dim {mesh_dim} hold {start} rows, "
                                 f"the full tensor has {shape[0]}")
        else:
            src.holders = [(0, 0, numel)]  # after full_tensor(), rank 0 holds everything
        sources.append(src)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter names collide after cleaning: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return sources
