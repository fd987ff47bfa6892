"""WeightSyncer: the in-place refresh of the engine's weights from an FSDP2 trainer.

Call `sync()` on every trainer rank after the optimizer step. What happens:

1. Rank 0 asks the engine what it holds and builds a SyncPlan (oreal/rollout/plan.py): the
   parameters, cast to the engine's dtypes, laid out into buckets of `bucket_bytes`. Names the
   engine does not know, shapes that differ, or engine weights the trainer does not send
   raise WeightMismatchError on every rank before a single byte moves.
2. Bucket by bucket, the shards are gathered into a flat buffer on rank 0, each rank
   contributing the element ranges it holds (oreal/rollout/sources.py); no rank ever
   materialises a full tensor, so rank 0's extra memory is the two bucket buffers. Two ways:
   - "p2p": point-to-point sends of each range to rank 0 over the trainer's own process group,
     received straight into the buffer (GPUs with NCCL, or ranks on several hosts);
   - "shm": ranks on rank 0's host with shards in CPU memory write their ranges straight into
     buffers in shared memory (oreal/rollout/shared_buffers.py), two barriers per bucket.
3. Each buffer is broadcast to the engine asynchronously while the next bucket is gathered
   into the other one; the engine puts each piece into its parameter by name (a vLLM worker
   through `load_weights`; the transformers engine receives straight into its parameters).
4. Rank 0 waits for the engine's acknowledgement and tells the other ranks the outcome, so
   all ranks return the new weights version or all raise the same error. A failure after
   bytes started moving (engine died, hung past the timeout) kills the engine and marks it
   broken: it cannot be used again until restarted and synced.

Steady-state syncs are cheap to start: the plan is computed once per engine process and
sent to the engine and the other ranks only when it changes, the engine's acceptance of a
known plan is collected just before the first broadcast, and rank 0's decisions travel as a
16-byte broadcast. The two bucket buffers are kept between syncs (as CUDA's caching
allocator would keep them anyway), so later syncs do not pay for fresh pages;
`keep_buffers=False` frees them after every sync.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch
import torch.distributed as dist

from oreal.rollout.errors import EngineError, EngineSyncError, WeightMismatchError
from oreal.rollout.gc_pause import gc_paused
from oreal.rollout.plan import Bucket, Piece, SyncPlan, check_specs, plan_buckets
from oreal.rollout.protocol import RolloutEngine
from oreal.rollout.shared_buffers import SharedBuffers, shared_memory_available
from oreal.rollout.sources import ParamSource, describe_parameters
from oreal.rollout.types import TensorSpec, dtype_from_name, dtype_name

DEFAULT_BUCKET_BYTES = 1 << 30
GATHER_MODES = ("auto", "p2p", "shm")


def _host_identity() -> tuple[str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return platform.node(), boot


class WeightSyncer:
    """Pushes an (FSDP2-sharded or plain) model's weights into a rollout engine.

    model: the trainer's module; every rank passes its own (sharded) copy.
    engine: the RolloutEngine on trainer rank 0 (from build_engine); None on other ranks.
    bucket_bytes: size of each of the two flat buffers (default 1 GiB).
    gather: "auto" (shared memory when every rank is on rank 0's host with CPU shards, else
        point-to-point), "p2p" or "shm".
    keep_buffers: keep the two buffers allocated between syncs (default True).
    allow_missing: accept syncing a subset of the engine's weights (e.g. frozen layers).
    name_map: optional renaming from the trainer's (cleaned) parameter names to the engine's.

    Construction is collective when torch.distributed is initialised (default group).
    """

    def __init__(self, model: torch.nn.Module, engine: RolloutEngine | None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, *, gather: str = "auto", keep_buffers: bool = True,
                 allow_missing: bool = False, name_map: Callable[[str], str] | None = None):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.rank == 0 and engine is None:
            raise ValueError("WeightSyncer: trainer rank 0 must pass the engine (other ranks pass None)")
        if bucket_bytes < 1 << 10:
            raise ValueError(f"WeightSyncer: bucket_bytes must be at least 1 KiB, got {bucket_bytes}")
        if gather not in GATHER_MODES:
            raise ValueError(f"WeightSyncer: gather must be one of {GATHER_MODES}, got {gather!r}")
        self.model = model
        self.engine = engine if self.rank == 0 else None
        self.bucket_bytes = int(bucket_bytes)
        self.keep_buffers = keep_buffers
        self.allow_missing = allow_missing
        self.sources: list[ParamSource] = describe_parameters(
            model, rank=self.rank, world_size=self.world_size, name_map=name_map)
        self.by_name = {s.name: s for s in self.sources}
        self.gather = self._choose_gather(gather)
        self.last_plan: SyncPlan | None = None
        self._plan_cache: tuple | None = None  # (engine incarnation, plan) on rank 0
        self._plan_sent: SyncPlan | None = None  # the plan every rank holds from the last "go"
        self._key_sent: tuple | None = None  # and the shared buffers they all mapped
        self._control_device = (torch.device("cuda", torch.cuda.current_device())
                                if self.distributed and dist.get_backend() == "nccl" else torch.device("cpu"))
        self._full_cache: tuple[str, torch.Tensor] | None = None
        self._wire: list[torch.Tensor] | None = None  # p2p: rank 0's two buffers
        self._shared: SharedBuffers | None = None  # shm: the mapping every rank writes into

    def _choose_gather(self, requested: str) -> str:
        if self.world_size == 1:
            return "p2p"  # nothing to gather: rank 0 copies its own tensors
        local_cpu = all(s.local_flat().device.type == "cpu" for s in self.sources)
        mine = (_host_identity(), local_cpu, shared_memory_available())
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        shm_ok = all(e[0] == everyone[0][0] and e[1] and e[2] for e in everyone)
        if requested == "shm" and not shm_ok:
            raise ValueError("WeightSyncer(gather='shm') needs every trainer rank on rank 0's host, with its "
                             "parameters in CPU memory and /dev/shm writable; use gather='p2p'")
        if requested == "auto":
            return "shm" if shm_ok else "p2p"
        return requested

    # ----- planning (rank 0) ---------------------------------------------------------------
    def make_plan(self) -> SyncPlan:
        """Rank 0: the plan for the engine's dtypes; raises WeightMismatchError if unsafe."""
        engine_specs = self.engine.weight_specs()
        specs = []
        for s in self.sources:
            want = engine_specs.get(s.name)
            specs.append(TensorSpec(s.name, s.shape, want.dtype if want is not None else dtype_name(s.dtype)))
        problems = check_specs(specs, engine_specs, allow_missing=self.allow_missing)
        if problems:
            raise WeightMismatchError(problems)
        return plan_buckets(specs, self.bucket_bytes)

    def _plan(self) -> SyncPlan:
        """Rank 0: make_plan(), reused while the engine process is the same one."""
        incarnation = getattr(self.engine, "incarnation", None)
        if incarnation is not None and self._plan_cache is not None and self._plan_cache[0] == incarnation:
            return self._plan_cache[1]
        plan = self.make_plan()
        self._plan_cache = (incarnation, plan)
        return plan

    def _agree(self, obj):
        """Rank 0's `obj` on every rank (no-op without torch.distributed)."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    # ----- buffers -----------------------------------------------------------------------------
    def _wire_buffers(self, capacity: int, slots: int, device: torch.device) -> list[torch.Tensor]:
        if (self._wire is None or len(self._wire) < slots or self._wire[0].numel() < capacity
                or self._wire[0].device != device):
            self._wire = None
            self._wire = [torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(slots)]
        return self._wire

    def _shared_for(self, plan: SyncPlan, key: tuple | None) -> SharedBuffers:
        """Rank 0 creates (or reuses) the shared buffers; the others map rank 0's `key`."""
        if self.rank == 0:
            slots = min(2, len(plan.buckets))
            if self._shared is None or self._shared.nbytes < plan.capacity or len(self._shared.slots) < slots:
                self._shared = None
                self._shared = SharedBuffers.create(plan.capacity, slots)
        elif self._shared is None or self._shared.key != tuple(key):
            self._shared = None
            self._shared = SharedBuffers.open(key)
        return self._shared

    def release_buffers(self) -> None:
        """Free the bucket buffers now (they are re-created by the next sync)."""
        self._wire = None
        self._shared = None

    # ----- moving bytes ----------------------------------------------------------------------
    def _full(self, src: ParamSource) -> torch.Tensor:
        """Fallback layouts: the full tensor via full_tensor() (collective), cached per name."""
        if self._full_cache is None or self._full_cache[0] != src.name:
            self._full_cache = None
            self._full_cache = (src.name, src.param.full_tensor().detach().reshape(-1))
        return self._full_cache[1]

    @staticmethod
    def _piece_view(piece: Piece, buf: torch.Tensor) -> torch.Tensor:
        wire = dtype_from_name(piece.dtype)
        return buf[piece.offset:piece.offset + piece.numel * wire.itemsize].view(wire)

    def _copy_fallback(self, bucket: Bucket, buf: torch.Tensor | None) -> None:
        """Pieces of non-Shard(0) layouts: full_tensor() on every rank, rank 0 copies."""
        for piece in bucket.pieces:
            src = self.by_name[piece.name]
            if src.mode == "gather":
                full = self._full(src)  # collective: every rank takes part, in plan order
                if self.rank == 0:
                    self._piece_view(piece, buf).copy_(full[piece.start:piece.start + piece.numel])

    def _copy_ranges(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """Copy the element ranges this rank holds into `buf`."""
        for piece in bucket.pieces:
            src = self.by_name[piece.name]
            mine = src.my_range(self.rank) if src.mode != "gather" else None
            if mine is None:
                continue
            lo, hi = mine
            a, b = max(lo, piece.start), min(hi, piece.start + piece.numel)
            if a < b:
                self._piece_view(piece, buf)[a - piece.start:b - piece.start].copy_(src.local_flat()[a - lo:b - lo])

    def _p2p_ops(self, bucket: Bucket, buf: torch.Tensor | None) -> list:
        """Rank 0: receives of the other ranks' ranges into `buf`; other ranks: the matching sends."""
        ops = []
        for k, piece in enumerate(bucket.pieces):
            src = self.by_name[piece.name]
            if src.mode == "gather":
                continue
            end = piece.start + piece.numel
            for holder, lo, hi in src.holders:
                a, b = max(lo, piece.start), min(hi, end)
                if a >= b or holder == 0 or (self.rank != 0 and holder != self.rank):
                    continue
                if self.rank == 0:
                    ops.append(dist.P2POp(dist.irecv, self._piece_view(piece, buf)[a - piece.start:b - piece.start],
                                          holder, tag=k))
                else:
                    part = src.local_flat()[a - lo:b - lo]
                    wire = dtype_from_name(piece.dtype)
                    ops.append(dist.P2POp(dist.isend, part if part.dtype == wire else part.to(wire), 0, tag=k))
        return ops

    def _gather_p2p(self, bucket: Bucket, buf: torch.Tensor | None) -> None:
        self._copy_fallback(bucket, buf)  # collectives first, never interleaved with the p2p ops
        ops = self._p2p_ops(bucket, buf)
        works = dist.batch_isend_irecv(ops) if ops else []
        if self.rank == 0:
            self._copy_ranges(bucket, buf)  # overlaps with the transfers
        for work in works:
            work.wait()

    def _move_p2p(self, plan: SyncPlan, transport) -> BaseException | None:
        """p2p mode: rank 0 gathers bucket i into one buffer while bucket i-1 is on the wire."""
        if self.rank != 0:
            for bucket in plan.buckets:
                self._gather_p2p(bucket, None)
            return None
        failure = None
        timeout_s = self.engine.sync_timeout_s
        # On the shards' device: NCCL point-to-point needs GPU buffers even when the data plane
        # is gloo (a transformers engine), and gloo broadcasts GPU tensors too.
        device = self.sources[0].local_flat().device if self.sources else transport.device
        buffers = self._wire_buffers(plan.capacity, min(2, len(plan.buckets)), device)
        in_flight = [None, None]
        for i, bucket in enumerate(plan.buckets):
            slot = i % 2
            if in_flight[slot] is not None:
                failure = failure or _wait(in_flight[slot], timeout_s)
                in_flight[slot] = None
            self._gather_p2p(bucket, buffers[slot])  # always: the other ranks are sending
            if failure is None:
                in_flight[slot], failure = _start(transport, buffers[slot][:bucket.nbytes], self.engine if i == 0 else None)
        for handle in in_flight:
            if handle is not None:
                failure = failure or _wait(handle, timeout_s)
        return failure

    def _move_shm(self, plan: SyncPlan, transport, key: tuple | None) -> BaseException | None:
        """shm mode: every rank writes bucket i into shared slot i % 2.

        Two barriers per bucket keep the wire busy: after the first (bucket i written
        everywhere) rank 0 queues its broadcast at once, behind the one still running; the
        second (rank 0 saw broadcast i-1 finish) frees slot (i+1) % 2 for the next writes.
        """
        shared = self._shared_for(plan, key)
        failure = None
        timeout_s = self.engine.sync_timeout_s if self.rank == 0 else None
        handles: list = [None] * len(plan.buckets)
        for i, bucket in enumerate(plan.buckets):
            slot = shared.slots[i % 2]
            self._copy_fallback(bucket, slot)
            self._copy_ranges(bucket, slot)
            self._barrier()
            if self.rank == 0:
                if i == 0:
                    shared.unlink()  # every rank has mapped it by now
                if failure is None:
                    handles[i], failure = _start(transport, slot[:bucket.nbytes], self.engine if i == 0 else None)
            if 1 <= i < len(plan.buckets) - 1:  # slot (i+1) % 2 is written next
                if self.rank == 0 and handles[i - 1] is not None:
                    failure = failure or _wait(handles[i - 1], timeout_s)
                    handles[i - 1] = None
                self._barrier()
        if self.rank == 0:
            for handle in handles[-2:]:
                if handle is not None:
                    failure = failure or _wait(handle, timeout_s)
            shared.unlink()  # (already gone unless the plan had no buckets)
        return failure

    def sync(self) -> int:
        """Copy the current weights into the engine; returns its new weights version.

        Must be called on every trainer rank. Raises WeightMismatchError (nothing written)
        or an EngineError (the engine is now broken) identically on all ranks. Python's
        cyclic garbage collector is paused for the duration (a full collection in a trainer
        process can take most of a second and would stall every rank and the engine).
        """
        with gc_paused(), torch.no_grad():
            return self._sync()

    def _tell(self, code: int, payload=None) -> tuple[int, object]:
        """Rank 0's (code, payload) on every rank: one 16-byte broadcast, plus a pickled object
        broadcast only when rank 0 has a payload (a new plan, an exception)."""
        if not self.distributed or self.world_size == 1:
            return code, payload
        box = torch.tensor([code, payload is not None] if self.rank == 0 else [0, 0], dtype=torch.int64,
                           device=self._control_device)
        dist.broadcast(box, src=0)
        code, has_payload = (int(v) for v in box.tolist())
        return code, (self._agree(payload) if has_payload else None)

    def _sync(self) -> int:
        # 1. Plan and handshake on rank 0, then every rank learns the plan or the refusal.
        code, payload, transport = _GO, None, None
        if self.rank == 0:
            try:
                plan = self._plan()
                transport = self.engine.open_transport()
                if self.gather == "shm" and transport.device.type != "cpu":
                    raise ValueError("gather='shm' needs a CPU data plane; this engine's is on "
                                     f"{transport.device}: use gather='p2p'")
                shm_key = self._shared_for(plan, None).key if self.gather == "shm" else None
                known = plan is self._plan_sent and shm_key == self._key_sent
                # A plan the engine accepted before is accepted again: do not wait for it to say so
                # before gathering (checked before the first broadcast instead).
                self.engine.begin_weight_update(plan, allow_missing=self.allow_missing, wait=not known)
                if not known:  # the plan and buffers travel to the other ranks only when they changed
                    payload = (plan, shm_key)
                self._plan_sent, self._key_sent = plan, shm_key
            except Exception as e:  # noqa: BLE001 - every rank must learn about it
                code, payload = _FAIL, e
                if self._shared is not None:  # never mapped by the others: do not leave it in /dev/shm
                    self._shared.unlink()
                    self._shared = None
        code, payload = self._tell(code, payload)
        if code == _FAIL:
            raise payload
        if payload is not None:
            self._plan_sent, self._key_sent = payload
        plan, shm_key = self._plan_sent, self._key_sent
        self.last_plan = plan

        # 2. Buckets: gather into one buffer while the other is on the wire.
        failure: BaseException | None = None
        version = None
        engine_state = ""
        try:
            if self.gather == "shm":
                failure = self._move_shm(plan, transport, shm_key)
            else:
                failure = self._move_p2p(plan, transport)
            if self.rank == 0:
                if failure is None:
                    version = self.engine.finish_weight_update()
                else:
                    engine_state = self.engine.abort_weight_update(_first_line(failure))
        except BaseException as e:  # noqa: BLE001 - reported to every rank below
            failure = e
            if self.rank == 0 and not isinstance(e, EngineError):
                engine_state = self.engine.abort_weight_update(_first_line(e))
        finally:
            self._full_cache = None
            if not self.keep_buffers:
                self.release_buffers()

        # 3. Everyone learns the outcome from rank 0: the new version, or -1 and the error.
        code, payload = 0, None
        if self.rank == 0:
            code, payload = (version, None) if failure is None else (-1, _as_sync_error(failure, engine_state))
        code, payload = self._tell(code, payload)
        if failure is not None and self.rank != 0:
            raise failure
        if code < 0:
            raise payload from failure
        return code


_GO, _FAIL = 0, 1


def _start(transport, tensor: torch.Tensor, engine=None):
    """Start a broadcast (once `engine` confirmed it awaits the buckets); (handle, None) or (None, the error)."""
    try:
        if engine is not None:
            engine.wait_weight_update_accepted()
        return transport.broadcast(tensor), None
    except Exception as e:  # noqa: BLE001
        return None, e


def _wait(handle, timeout_s: float) -> BaseException | None:
    try:
        handle.wait(timeout_s)
        return None
    except Exception as e:  # noqa: BLE001
        return e


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _as_sync_error(failure: BaseException, engine_state: str) -> EngineSyncError:
    if isinstance(failure, EngineSyncError):
        return failure
    state = f"; {engine_state}" if engine_state else ""
    return EngineSyncError(
        f"weight sync failed after bytes started moving ({_first_line(failure)}){state}. "
        "The engine was killed and must not be used: call engine.restart() and sync again"
    )
