"""The data plane on CPU: a two-party gloo group between trainer rank 0 and the engine.

It is created from its own TCPStore (rank 0 hosts it on a free port, listening on the sync
host's address only), so it lives beside whatever `torch.distributed` world the trainer has
and never touches it. Broadcasts are asynchronous: `broadcast` returns a handle whose
`wait(timeout_s)` raises on failure or timeout, which is what lets the syncer overlap
gathering with sending and still never hang.
The vLLM data plane (NCCL through vLLM's PyNcclCommunicator) has the same shape and lives
in oreal/rollout/vllm.py.
"""

from __future__ import annotations

import datetime
import socket
from typing import Protocol

import torch
import torch.distributed as dist


class BroadcastHandle(Protocol):
    def wait(self, timeout_s: float) -> None: ...


class Transport(Protocol):
    """Trainer rank 0's end of the data plane (root of every broadcast)."""

    device: torch.device

    def broadcast(self, tensor: torch.Tensor) -> BroadcastHandle: ...

    def close(self) -> None: ...


class _WorkHandle:
    def __init__(self, work, what: str):
        self.work = work
        self.what = what

    def wait(self, timeout_s: float) -> None:
        self.work.wait(datetime.timedelta(seconds=timeout_s))


def listening_store(host: str, world_size: int, timeout_s: float, port: int = 0) -> dist.TCPStore:
    """A TCPStore server that listens on `host`'s address only (port 0: a free one, `store.port`).

    Left to itself a TCPStore server listens on every interface whatever host it is given, so a
    store meant for loopback would be reachable from the network: bind the socket here and hand
    it over.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(128)
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, True,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now and closes it with the store
    return store


def _gloo_group(store, rank: int, world_size: int, host: str, timeout_s: float):
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


class GlooTransport:
    """Either end of the trainer <-> transformers-engine gloo group (rank 0 is the trainer)."""

    device = torch.device("cpu")

    def __init__(self, pg, store):
        self.pg = pg
        self._store = store  # keep the store (and on rank 0 its server) alive with the group

    @staticmethod
    def host_store(host: str, timeout_s: float) -> dist.TCPStore:
        """Rank 0: a store on a free port (`store.port`) of `host` only, not yet waiting for anyone."""
        return listening_store(host, 2, timeout_s)

    @classmethod
    def join(cls, store: dist.TCPStore, rank: int, host: str, timeout_s: float, prefix: str) -> "GlooTransport":
        """Build the group; blocks until both ends have joined or `timeout_s` passes."""
        pg = _gloo_group(dist.PrefixStore(prefix, store), rank, 2, host, timeout_s)
        return cls(pg, store)

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float, prefix: str) -> "GlooTransport":
        """Engine side (rank 1)."""
        store = dist.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=timeout_s))
        return cls.join(store, 1, host, timeout_s, prefix)

    def broadcast(self, tensor: torch.Tensor) -> _WorkHandle:
        """Rank 0 sends `tensor`, rank 1 receives into it; returns at once."""
        return _WorkHandle(self.pg.broadcast(tensor, 0), "broadcast")

    def close(self) -> None:
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001 - best effort on a group that may already be broken
            pass
