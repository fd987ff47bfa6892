"""The bucket layout of a weight sync, and the name/shape check that precedes it.

A sync moves a list of tensors (TensorSpec: name, full shape, wire dtype) in buckets: flat
byte buffers of at most `bucket_bytes`. Each bucket holds pieces; a piece is a contiguous
element range of one tensor's row-major flattening, placed at an aligned byte offset. Tensors
that fit in a bucket are never split (they move to the next bucket instead), so most pieces
are whole tensors; a tensor larger than the bucket is cut into consecutive pieces that fill
whole buckets. The same plan object drives the trainer (what to gather and where to put it)
and the engine (where to copy each piece), so both sides agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from oreal.rollout.types import TensorSpec

ALIGN_BYTES = 64  # every piece starts on a cache-line boundary; also a multiple of any dtype size
RAMP_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)  # target sizes of the first buckets, as fractions of bucket_bytes


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of tensor `name`, stored at byte `offset` of its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int
    numel: int
    offset: int

    @property
    def tensor_numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.numel == self.tensor_numel


@dataclass(frozen=True)
class Bucket:
    index: int
    nbytes: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class SyncPlan:
    """Buckets in send order; `capacity` is the largest bucket (the size of each buffer)."""

    specs: tuple[TensorSpec, ...]
    buckets: tuple[Bucket, ...]
    bucket_bytes: int

    @property
    def capacity(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def to_dict(self) -> dict:
        """Plain lists, ints and strings only (JSON-safe): crosses vLLM's RPC encoders unchanged."""
        return {
            "bucket_bytes": self.bucket_bytes,
            "specs": [[s.name, list(s.shape), s.dtype] for s in self.specs],
            "buckets": [[b.nbytes, [[p.name, list(p.shape), p.dtype, p.start, p.numel, p.offset] for p in b.pieces]]
                        for b in self.buckets],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SyncPlan":
        specs = tuple(TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in data["specs"])
        buckets = tuple(
            Bucket(i, int(nbytes), tuple(Piece(n, tuple(shape), dt, int(st), int(nu), int(off))
                                         for n, shape, dt, st, nu, off in pieces))
            for i, (nbytes, pieces) in enumerate(data["buckets"]))
        return cls(specs, buckets, int(data["bucket_bytes"]))


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int, *, ramp: bool = True) -> SyncPlan:
    """Lay `specs` out, in order, into buckets of at most `bucket_bytes` bytes.

    With `ramp`, the first buckets are smaller (1/8, 1/4, 1/2 of `bucket_bytes`, then full):
    the first broadcast can only start once the first bucket is gathered, so a small first
    bucket gets the pipeline going sooner. A tensor that fits in `bucket_bytes` is never
    split, even where it exceeds a ramp bucket's target.
    """
    specs = tuple(specs)
    if bucket_bytes < ALIGN_BYTES:
        raise ValueError(f"bucket_bytes must be at least {ALIGN_BYTES}, got {bucket_bytes}")
    # A multiple of the alignment: the pieces of a split tensor then fill whole buckets exactly,
    # so an engine may lay buckets out back to back and find every tensor contiguous.
    bucket_bytes = bucket_bytes // ALIGN_BYTES * ALIGN_BYTES
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names must be unique, repeated: {dup}")

    def target(index: int) -> int:
        if not ramp or index >= len(RAMP_FRACTIONS):
            return bucket_bytes
        return max(ALIGN_BYTES, int(bucket_bytes * RAMP_FRACTIONS[index]) // ALIGN_BYTES * ALIGN_BYTES)

    buckets: list[Bucket] = []
    pieces: list[Piece] = []
    used = 0

    def close():
        nonlocal pieces, used
        if pieces:
            buckets.append(Bucket(len(buckets), used, tuple(pieces)))
        pieces, used = [], 0

    for spec in specs:
        esize = spec.element_size
        if spec.numel == 0:
            continue
        if spec.nbytes <= bucket_bytes:
            if pieces and _align(used) + spec.nbytes > target(len(buckets)):
                close()
            offset = _align(used)
            pieces.append(Piece(spec.name, spec.shape, spec.dtype, 0, spec.numel, offset))
            used = offset + spec.nbytes
            continue
        # Larger than a bucket: consecutive pieces, each filling a whole fresh bucket.
        close()
        per_piece = bucket_bytes // esize
        start = 0
        while start < spec.numel:
            n = min(per_piece, spec.numel - start)
            pieces.append(Piece(spec.name, spec.shape, spec.dtype, start, n, 0))
            used = n * esize
            close()
            start += n
    close()
    return SyncPlan(specs, tuple(buckets), bucket_bytes)


def check_specs(
    sent: Iterable[TensorSpec], engine: Mapping[str, TensorSpec], *, allow_missing: bool = False
) -> list[str]:
    """Problems that make a sync unsafe, one line each; empty when the sync may proceed.

    Unknown names and shape differences always count. Engine weights the trainer does not
    send count too unless `allow_missing` (they would silently keep stale values).
    Dtypes may differ: the trainer casts to the engine's dtype before sending.
    """
    problems: list[str] = []
    seen = set()
    for spec in sent:
        seen.add(spec.name)
        want = engine.get(spec.name)
        if want is None:
            problems.append(f"unknown to the engine: {spec.name} {list(spec.shape)}")
        elif tuple(want.shape) != tuple(spec.shape):
            problems.append(f"shape differs: {spec.name} trainer {list(spec.shape)} vs engine {list(want.shape)}")
        elif want.dtype != spec.dtype:
            problems.append(f"wire dtype differs: {spec.name} sends {spec.dtype}, engine holds {want.dtype}")
    if not allow_missing:
        for name in engine:
            if name not in seen:
                problems.append(f"not sent by the trainer (engine would keep a stale value): {name}")
    return problems
