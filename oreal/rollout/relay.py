"""Weight sync to the engines of other nodes: trainer rank 0 relays each bucket through their node's owner.

`WeightSyncer` gathers every bucket once, on trainer rank 0, and broadcasts it to an engine. On a multi-node
job the engines of node k belong to node k's local rank 0 (the owner; oreal/rollout/placement.py). Rank 0
sees each other owner as one more engine, a `RemoteNode` inside its `EngineFanOut`: the bucket goes to the
owner once over a two-rank group (NCCL between GPUs, gloo on CPU), and the owner forwards it to its own
engines over their data planes, receiving bucket i + 1 while bucket i is forwarded. Cross-node traffic is
one copy per node, whatever the number of engines there.

The owner serves rank 0 from a thread (`RelayServer`) for the length of one sync, while its main thread
takes part in the syncer's own gathers. Rank 0 drives it with small messages on the same two-rank group:
the engines' weight specs, "begin" with the plan (the owner's engines check it before any byte moves, and
a refusal reaches rank 0 as the same WeightMismatchError), "finish" (the owner's engines' new version, or
their error), "abort", and "done" at the end of every sync, so the thread always ends.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from oreal.rollout.errors import EngineSyncError
from oreal.rollout.fanout import EngineFanOut
from oreal.rollout.plan import SyncPlan
from oreal.rollout.types import TensorSpec


def _send(obj, dst: int, group) -> None:
    dist.send_object_list([obj], dst=dst, group=group)


def _recv(src: int, group):
    box = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


class _Handle:
    def __init__(self, works: list):
        self.works = works

    def wait(self, timeout_s: float) -> None:
        import datetime

        for work in self.works:
            if not work.wait(datetime.timedelta(seconds=timeout_s)):
                raise TimeoutError(f"relay broadcast did not complete within {timeout_s:.0f}s")


def _header(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


class _PairTransport:
    """Rank 0's end of the bucket stream to one owner: each bucket is preceded by its index (8 bytes), so that
    an abort (index -1) can end the stream early without the owner waiting for buckets that never come."""

    def __init__(self, node: RemoteNode):
        self.node = node
        self.device = node.device

    def broadcast(self, tensor: torch.Tensor) -> _Handle:
        node = self.node
        header = _header(node.sent, self.device)
        works = [dist.broadcast(header, src=0, group=node.group, async_op=True),
                 dist.broadcast(tensor, src=0, group=node.group, async_op=True)]
        node.sent += 1
        return _Handle(works)

    def close(self) -> None:
        pass


class RemoteNode:
    """On trainer rank 0: the engines of another node, reached through their owner (a RolloutEngine for the
    syncer; generation goes through DedicatedEngines, not here)."""

    def __init__(self, owner: int, group, device: torch.device, sync_timeout_s: float):
        self.owner = owner
        self.group = group
        self.device = device
        self.sync_timeout_s = sync_timeout_s
        self.incarnation = None  # remote restarts are checked by the owner's engines against the plan they hold
        self._plan_sent: SyncPlan | None = None
        self.sent = 0  # buckets of the current sync sent so far
        self.expected = 0  # buckets the current sync's plan has

    def _ask(self, *message):
        _send(message, self.owner, self.group)
        status, payload = _recv(self.owner, self.group)
        if status == "error":
            raise payload
        return payload

    def weight_specs(self) -> dict[str, TensorSpec]:
        return self._ask("specs")

    def open_transport(self) -> _PairTransport:
        return _PairTransport(self)

    def begin_weight_update(self, plan: SyncPlan, allow_missing: bool = False, *, wait: bool = True) -> None:
        self.sent, self.expected = 0, 0
        self._ask("begin", None if plan is self._plan_sent else plan, allow_missing)
        self._plan_sent = plan
        self.sent, self.expected = 0, len(plan.buckets)

    def wait_weight_update_accepted(self) -> None:
        pass  # "begin" already waited for the owner's engines to accept

    def finish_weight_update(self) -> int:
        return self._ask("finish")

    def abort_weight_update(self, reason: str) -> str:
        try:
            if self.sent < self.expected:  # the owner is waiting for a bucket: tell it none will come
                dist.broadcast(_header(-1, self.device), src=0, group=self.group)
                self.sent = self.expected
            return f"node of trainer rank {self.owner}: {self._ask('abort', reason)}"
        except Exception as exc:  # noqa: BLE001 - the owner may be the one that failed
            return f"node of trainer rank {self.owner}: abort not confirmed ({type(exc).__name__}: {exc})"

    def done(self) -> None:
        _send(("done",), self.owner, self.group)

    def close(self) -> None:
        pass


class RelayServer:
    """On an owner other than rank 0: serves rank 0's messages for one sync, forwarding buckets to `engines`."""

    def __init__(self, engines: list, group, device: torch.device):
        self.fanout = EngineFanOut(engines)
        self.group = group
        self.device = device
        self._plan: SyncPlan | None = None
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.forward_failure: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="oreal-weight-relay", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _reply(self, fn, *args) -> None:
        try:
            _send(("ok", fn(*args)), 0, self.group)
        except Exception as exc:  # noqa: BLE001 - rank 0 raises it
            _send(("error", exc), 0, self.group)

    def _serve(self) -> None:
        try:
            while True:
                message = _recv(0, self.group)
                kind = message[0]
                if kind == "done":
                    return
                if kind == "specs":
                    self._reply(self.fanout.weight_specs)
                elif kind == "begin":
                    plan = message[1] if message[1] is not None else self._plan
                    self._plan = plan
                    ok = self._begin(plan, message[2])
                    if ok:
                        self._forward(plan)
                elif kind == "finish":
                    self._reply(self._finish)
                elif kind == "abort":
                    self._reply(self.fanout.abort_weight_update, message[1])
        except Exception as exc:  # noqa: BLE001 - rank 0 times out on its side and reports it
            self.failure = exc

    def _finish(self) -> int:
        if self.forward_failure is not None:
            failure, self.forward_failure = self.forward_failure, None
            raise EngineSyncError(f"the engines of trainer rank {dist.get_rank()}'s node: {failure}")
        return self.fanout.finish_weight_update()

    def _begin(self, plan: SyncPlan, allow_missing: bool) -> bool:
        try:
            self._transport = self.fanout.open_transport()  # before "sync": the engines join their data plane first
            self.fanout.begin_weight_update(plan, allow_missing, wait=True)
        except Exception as exc:  # noqa: BLE001
            _send(("error", exc), 0, self.group)
            return False
        _send(("ok", None), 0, self.group)
        return True

    def _forward(self, plan: SyncPlan) -> None:
        """Receive every bucket from rank 0 (two buffers) and broadcast it on to this node's engines."""
        slots = [torch.empty(plan.capacity, dtype=torch.uint8, device=self.device) for _ in range(min(2, len(plan.buckets)))]
        pending: list = [None] * len(slots)
        failure = None
        header = _header(0, self.device)
        for i, bucket in enumerate(plan.buckets):
            dist.broadcast(header, src=0, group=self.group)
            if int(header.item()) != i:  # -1: rank 0 gave up on this sync
                failure = failure or RuntimeError("trainer rank 0 aborted the weight sync")
                break
            s = i % len(slots)
            if pending[s] is not None:  # the slot's previous bucket must be out before it is overwritten
                try:
                    pending[s].wait(self.fanout.sync_timeout_s)
                except Exception as exc:  # noqa: BLE001 - keep receiving: rank 0 is still sending
                    failure = failure or exc
                pending[s] = None
            view = slots[s][:bucket.nbytes]
            dist.broadcast(view, src=0, group=self.group)
            if failure is None:
                try:
                    pending[s] = self._transport.broadcast(view)
                except Exception as exc:  # noqa: BLE001
                    failure = exc
        for handle in pending:
            if handle is not None:
                try:
                    handle.wait(self.fanout.sync_timeout_s)
                except Exception as exc:  # noqa: BLE001
                    failure = failure or exc
        if failure is not None:  # the owner's engines are half-written: finish reports it
            reason = f"relay forward failed: {type(failure).__name__}: {(str(failure).splitlines() or [''])[0]}"
            self.forward_failure = f"{reason} ({self.fanout.abort_weight_update(reason)})"


def pair_groups(owner_ranks: list[int], device: torch.device, timeout_s: float) -> dict[int, object]:
    """A two-rank group (rank 0, owner) for every owner other than rank 0, NCCL when the buckets are on GPUs;
    collective on every rank (ranks outside a pair hold a placeholder)."""
    import datetime

    backend = "nccl" if device.type == "cuda" else "gloo"
    groups = {}
    for owner in owner_ranks:
        if owner == 0:
            continue
        groups[owner] = dist.new_group([0, owner], backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return groups


class RelayedSyncer:
    """`WeightSyncer` plus the relays of a multi-node job: owners serve rank 0 for the length of each sync,
    and rank 0 ends every sync with "done" to each of them (whatever happened), so no relay thread lingers."""

    def __init__(self, syncer, *, remotes: list[RemoteNode] = (), server: RelayServer | None = None,
                 timeout_s: float = 600.0):
        self.syncer = syncer
        self.remotes = list(remotes)
        self.server = server
        self.timeout_s = timeout_s

    @property
    def last_plan(self):
        return self.syncer.last_plan

    def sync(self) -> int:
        if self.server is not None:
            self.server.start()
        try:
            return self.syncer.sync()
        finally:
            for remote in self.remotes:
                remote.done()
            if self.server is not None:
                self.server.join(self.timeout_s)
