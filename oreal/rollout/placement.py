"""Where the rollout engines live, and which engine answers which prompt.

Pure functions (no process group, no engine), shared by the launcher and `DistributedGenerator`:

- `dedicated_layout`: `num_engines` data-parallel engines spread evenly over the job's nodes. Each
  node's local rank 0 owns its node's engines (starts them, talks to them, feeds them weights), so no
  engine process is ever started from another node; the node's engine GPUs (`gpus`) are handed out in
  order, `tensor_parallel_size` to an engine.
- `colocated_groups`: one engine per `tensor_parallel_size` consecutive trainer ranks (vLLM's
  external-launcher tensor-parallel groups are made of trainer ranks).
- `spread_prompts`: a step's prompts over the engines by expected tokens, longest first onto the
  least-loaded engine; all samples of a prompt on one engine (prefix caching serves the other n - 1).
  Every rank computes the same answer from the same inputs, so nothing about it is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PlacementError(ValueError):
    """The engines cannot be laid out as configured; the message names the option to change."""


@dataclass(frozen=True)
class DedicatedLayout:
    """Engine e (0-based, node-major) runs on node `e // per_node`, owned by global rank `owners[e]`."""

    num_engines: int
    nodes: int
    ranks_per_node: int
    per_node: int
    owners: tuple[int, ...]  # the owning trainer rank of every engine
    gpus: tuple[str | None, ...]  # CUDA_VISIBLE_DEVICES of every engine (None: inherit)

    @property
    def owner_ranks(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.owners))

    def engines_of(self, rank: int) -> list[int]:
        return [e for e, owner in enumerate(self.owners) if owner == rank]


def dedicated_layout(num_engines: int, world_size: int, ranks_per_node: int, tensor_parallel_size: int = 1,
                     gpus: str = "") -> DedicatedLayout:
    """The engines' owners and GPUs; `ranks_per_node` is torchrun's LOCAL_WORLD_SIZE."""
    if num_engines < 1:
        raise PlacementError(f"--rollout.num_engines: must be >= 1, got {num_engines}")
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise PlacementError(f"{world_size} trainer ranks do not form whole nodes of {ranks_per_node} "
                             "(torchrun's LOCAL_WORLD_SIZE): launch the same --nproc_per_node on every node")
    nodes = world_size // ranks_per_node
    if num_engines % nodes:
        raise PlacementError(f"--rollout.num_engines: {num_engines} engines do not split evenly over {nodes} nodes "
                             f"(each node's local rank 0 owns its node's engines); use a multiple of {nodes}")
    per_node = num_engines // nodes
    owners = tuple((e // per_node) * ranks_per_node for e in range(num_engines))
    devices = [d.strip() for d in gpus.split(",") if d.strip()] if gpus else []
    if not devices:
        engine_gpus: tuple[str | None, ...] = (None,) * num_engines
    else:
        need = per_node * tensor_parallel_size
        if len(devices) != need:
            raise PlacementError(
                f"--rollout.gpus: {len(devices)} GPUs ({gpus!r}) for {per_node} engine(s) per node of "
                f"tensor_parallel_size {tensor_parallel_size}: list exactly {need} GPUs per node")
        slices = [",".join(devices[j * tensor_parallel_size:(j + 1) * tensor_parallel_size]) for j in range(per_node)]
        engine_gpus = tuple(slices[e % per_node] for e in range(num_engines))
    return DedicatedLayout(num_engines, nodes, ranks_per_node, per_node, owners, engine_gpus)


def colocated_groups(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """The trainer ranks of each colocated engine: consecutive blocks of `tensor_parallel_size`."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise PlacementError(f"--rollout.tensor_parallel_size: {tensor_parallel_size} does not divide the "
                             f"{world_size} trainer ranks; the colocated placement makes every engine's "
                             "tensor-parallel group out of trainer ranks")
    return [list(range(g, g + tensor_parallel_size)) for g in range(0, world_size, tensor_parallel_size)]


def expected_tokens(prompt_length: int, n: int, response_tokens: int) -> int:
    """The tokens an engine spends on one prompt: its n samples, each the prompt and a response.

    Nothing known before sampling says which response will be long, so every response counts as the
    budget (`max_new_tokens`): an upper bound, and the length that decides a step's tail."""
    return n * (prompt_length + response_tokens)


def spread_prompts(prompt_lengths: Sequence[int], n: int, num_engines: int, response_tokens: int) -> list[int]:
    """The engine of every prompt: largest expected cost first, each onto the least-loaded engine (ties: the
    lower index). Deterministic, so every rank gets the same assignment and resumed runs the same samples."""
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    costs = [expected_tokens(length, n, response_tokens) for length in prompt_lengths]
    load = [0] * num_engines
    engine_of = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        e = min(range(num_engines), key=lambda e: (load[e], e))
        engine_of[i] = e
        load[e] += costs[i]
    return engine_of
