"""Flat buffers in shared memory that every trainer rank on one host maps.

When the trainer ranks share a host and keep their shards in CPU memory (the gloo/CPU case),
gathering a bucket on rank 0 does not need to go through sockets: each rank writes the element
ranges it holds straight into the shared bucket buffer, and rank 0 broadcasts it from there.
That replaces a TCP transfer of every remote shard with one memory copy, done by the rank that
owns the shard, in parallel with the others.

The file lives in /dev/shm only until every rank has mapped it (rank 0 unlinks it after the
first barrier), so a crashed job leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import secrets

import torch

from oreal.rollout.plan import ALIGN_BYTES

SHM_DIR = "/dev/shm"


def shared_memory_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class SharedBuffers:
    """`slots` buffers of `nbytes` each, backed by one shared mapping."""

    def __init__(self, path: str, nbytes: int, slots: int, create: bool):
        self.path = path
        self.nbytes = nbytes
        stride = (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES  # every slot starts aligned
        size = max(stride * slots, 1)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=size)
        self.slots = [flat[k * stride:k * stride + nbytes] for k in range(slots)]

    @property
    def key(self) -> tuple[str, int, int]:
        """What another rank needs to map the same buffers."""
        return self.path, self.nbytes, len(self.slots)

    @classmethod
    def create(cls, nbytes: int, slots: int) -> "SharedBuffers":
        return cls(os.path.join(SHM_DIR, f"oreal-sync-{os.getpid()}-{secrets.token_hex(6)}"), nbytes, slots, True)

    @classmethod
    def open(cls, key: tuple[str, int, int]) -> "SharedBuffers":
        path, nbytes, slots = key
        return cls(path, nbytes, slots, False)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
