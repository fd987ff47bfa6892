"""Several engines behind one RolloutEngine, for the weight sync: one gather per bucket, every engine fed.

`WeightSyncer` drives one engine from trainer rank 0. `EngineFanOut` is that engine when rank 0 owns
several: the plan is checked against every engine's weights (they must agree, and match the trainer)
before any byte moves, each engine accepts the plan, and every gathered bucket is broadcast to all of
them at once, one data plane per engine (`FanOutTransport`).

One group per engine, rather than one group holding every engine's workers, for three reasons.
Measured (`python -m benchmarks.bench_rollout --only transport`, benchmarks/results/rollout.md: 256 MiB in
8 buckets from one root to 1, 2, 4 receivers over gloo on the 2-core CPU box): neither is consistently
faster there; at 4 receivers one group took 1.51x the per-engine time in one run and 0.41x in the next,
at 2 receivers 0.64x and 1.09x (the box was shared, load 13-19). Each engine keeps its own data plane,
timeout and failure: one dead engine does not stall the others' broadcast, and the engines need no change
(a transformers engine joins a two-party group, a vLLM engine a group of 1 + its workers). And the
cross-node copies, where one group would pay off most, are already one per node: rank 0 relays each bucket
through every other node's owner (oreal/rollout/relay.py). On NCCL a single group would pipeline its
broadcast through the receivers; that is the case to measure when a GPU machine is at hand (not yet done).
"""

from __future__ import annotations

from collections.abc import Sequence

from oreal.rollout.errors import EngineSyncError, WeightMismatchError
from oreal.rollout.plan import SyncPlan
from oreal.rollout.types import TensorSpec


class _AllHandles:
    def __init__(self, handles: list):
        self.handles = handles

    def wait(self, timeout_s: float) -> None:
        failure = None
        for handle in self.handles:  # wait for all, even after one failed: none is left mid-flight
            try:
                handle.wait(timeout_s)
            except Exception as exc:  # noqa: BLE001
                failure = failure or exc
        if failure is not None:
            raise failure


class FanOutTransport:
    """One broadcast call, one broadcast per engine's data plane, all in flight together."""

    def __init__(self, transports: Sequence):
        devices = {str(t.device) for t in transports}
        if len(devices) != 1:
            raise EngineSyncError(f"the engines' data planes are on different devices ({sorted(devices)}); "
                                  "one bucket buffer cannot feed them all")
        self.transports = list(transports)
        self.device = self.transports[0].device

    def broadcast(self, tensor):
        return _AllHandles([t.broadcast(tensor) for t in self.transports])

    def close(self) -> None:
        for t in self.transports:
            t.close()


class EngineFanOut:
    """The engines trainer rank 0 owns, seen by `WeightSyncer` as one engine."""

    def __init__(self, engines: Sequence):
        if not engines:
            raise ValueError("EngineFanOut needs at least one engine")
        self.engines = list(engines)

    @property
    def sync_timeout_s(self) -> float:
        return max(e.sync_timeout_s for e in self.engines)

    @property
    def incarnation(self) -> tuple:
        return tuple(getattr(e, "incarnation", None) for e in self.engines)

    def weight_specs(self) -> dict[str, TensorSpec]:
        first = self.engines[0].weight_specs()
        problems = []
        for index, engine in enumerate(self.engines[1:], start=1):
            specs = engine.weight_specs()
            if specs != first:
                names = sorted(set(specs) ^ set(first)) + sorted(n for n in set(specs) & set(first)
                                                                  if specs[n] != first[n])
                problems.append(f"engine {index} holds other weights than engine 0: {names[:10]}")
        if problems:
            raise WeightMismatchError(problems)
        return first

    def open_transport(self) -> FanOutTransport:
        return FanOutTransport([e.open_transport() for e in self.engines])

    def begin_weight_update(self, plan: SyncPlan, allow_missing: bool = False, *, wait: bool = True) -> None:
        begun = []
        try:
            for engine in self.engines:
                engine.begin_weight_update(plan, allow_missing, wait=False)
                begun.append(engine)
            if wait:
                self.wait_weight_update_accepted()
        except BaseException as exc:
            for engine in begun:  # they await buckets that will never come
                engine.abort_weight_update(f"another engine refused the plan: {type(exc).__name__}")
            raise

    def wait_weight_update_accepted(self) -> None:
        for engine in self.engines:
            engine.wait_weight_update_accepted()

    def finish_weight_update(self) -> int:
        versions, failure = [], None
        for engine in self.engines:
            try:
                versions.append(engine.finish_weight_update())
            except Exception as exc:  # noqa: BLE001 - finish the others first
                failure = failure or exc
        if failure is not None:
            raise failure
        if len(set(versions)) != 1:
            raise EngineSyncError(f"the engines disagree on their weights version after the sync: {versions}")
        return versions[0]

    def abort_weight_update(self, reason: str) -> str:
        return "; ".join(f"engine {i}: {e.abort_weight_update(reason)}" for i, e in enumerate(self.engines))

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
