"""The RolloutEngine protocol: what the trainer may call on a generator.

Two groups of calls. Generation: `generate` returns K samples per prompt with the
sampler's per-token log-probs. Weight update (driven by WeightSyncer on trainer rank 0, not
by user code): `weight_specs` tells the trainer what the engine holds, `open_transport` sets
up the data plane once, `begin_weight_update` checks a SyncPlan and makes the engine wait
for its buckets (`wait_weight_update_accepted` collects the engine's yes when it was not
awaited at once), `finish_weight_update` waits until every byte is in place (the engine's
weights version goes up by one), and `abort_weight_update` gives up on an engine whose
weights are half-written. Both engines (transformers on CPU, vLLM on GPUs) implement it
through the same EngineClient, talking to an engine process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from oreal.rollout.plan import SyncPlan
from oreal.rollout.transport import Transport
from oreal.rollout.types import Rollout, SamplingParams, TensorSpec


@runtime_checkable
class RolloutEngine(Protocol):
    sync_timeout_s: float

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[Rollout]:
        """n samples for each prompt, ordered prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...]."""
        ...

    def weight_specs(self) -> dict[str, TensorSpec]: ...

    def open_transport(self) -> Transport: ...

    def begin_weight_update(self, plan: SyncPlan, allow_missing: bool = False, *, wait: bool = True) -> None: ...

    def wait_weight_update_accepted(self) -> None: ...

    def finish_weight_update(self) -> int: ...

    def abort_weight_update(self, reason: str) -> str: ...

    def close(self) -> None: ...
