"""Generation for every trainer rank through the one rollout engine that trainer rank 0 owns.

Each rank holds its own share of the step's prompts. `DistributedGenerator.generate` gathers
the prompts on rank 0, asks the engine for n samples of each in one call (so the engine batches
across ranks), and sends every rank back the samples of its own prompts. An engine failure on
rank 0 (process died, hung past its timeout, refused) reaches every rank as the same
`GenerationError`, so no rank waits forever on a collective the others have left.

`sync()` refreshes the engine's weights from the FSDP2 policy (`oreal.rollout.WeightSyncer`);
every rank calls it.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch.distributed as dist


class GenerationError(RuntimeError):
    """The rollout engine failed; raised on every rank with rank 0's explanation."""


class DistributedGenerator:
    def __init__(self, engine, syncer, *, rank: int, world_size: int, group=None):
        self.engine = engine  # the RolloutEngine on rank 0, None elsewhere
        self.syncer = syncer
        self.rank, self.world_size = rank, world_size
        self.group = group  # a gloo group for Python objects (None: the default group)

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling) -> list[list]:
        """n samples (engine `Rollout`s) for each of this rank's prompts, in prompt order."""
        local = [list(map(int, p)) for p in prompt_ids]
        if self.world_size == 1:
            return self._split(self._engine_generate([local], n, sampling), [len(local)], n)[0]
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=0, group=self.group)
        outputs = [None] * self.world_size
        if self.rank == 0:
            try:
                rollouts = self._engine_generate(gathered, n, sampling)
                outputs = self._split(rollouts, [len(p) for p in gathered], n)
            except Exception as exc:  # noqa: BLE001 - every rank must hear about it
                outputs = [("error", f"{type(exc).__name__}: {exc}")] * self.world_size
        received = [None]
        dist.scatter_object_list(received, outputs if self.rank == 0 else None, src=0, group=self.group)
        result = received[0]
        if isinstance(result, tuple) and result and result[0] == "error":
            raise GenerationError(f"the rollout engine on trainer rank 0 failed: {result[1]}")
        return result

    def _engine_generate(self, per_rank: list[list[list[int]]], n: int, sampling) -> list:
        flat = [p for prompts in per_rank for p in prompts]
        if not flat:
            return []
        rollouts = self.engine.generate(flat, n=n, sampling=sampling)
        if len(rollouts) != len(flat) * n:
            raise GenerationError(f"the engine returned {len(rollouts)} samples for {len(flat)} prompts x {n}")
        return rollouts

    @staticmethod
    def _split(rollouts: list, counts: list[int], n: int) -> list[list[list]]:
        """Prompt-major flat rollouts -> per rank, per prompt, n samples."""
        out, offset = [], 0
        for count in counts:
            per_prompt = [rollouts[(offset + i) * n:(offset + i + 1) * n] for i in range(count)]
            out.append(per_prompt)
            offset += count
        return out

    def sync(self) -> float:
        """Push the policy's current weights into the engine (every rank); returns seconds taken."""
        start = time.perf_counter()
        self.syncer.sync()
        return time.perf_counter() - start

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
