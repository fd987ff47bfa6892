"""The loop that runs inside one judge worker process (started by `worker_pool.JudgePool`).

Protocol over two pipes (multiprocessing `Connection`s, pickled tuples):
parent -> worker: `(task_id, pred, gold, decimal_policy)`, or `None` to exit;
worker -> parent: `("ready", pid)` once after imports, then `(task_id, equal, reason)` per task.

This module must stay importable without the `oreal` package's `__init__` (which imports torch): the
bootstrap registers `oreal` and `oreal.reward` as bare packages and imports only what `compare` needs.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection


def serve(read_fd: int, write_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which kills us
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    import sympy  # noqa: F401  (imported now so the first task does not pay for it)

    from oreal.reward.equivalence import compare

    outbox.send(("ready", os.getpid()))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, pred, gold, decimal_policy = message
        try:
            verdict = compare(pred, gold, decimal_policy=decimal_policy)
            reply = (task_id, bool(verdict.equal), verdict.reason)
        except BaseException as e:  # noqa: BLE001  one bad item must not take the worker down
            if isinstance(e, KeyboardInterrupt):
                raise
            reply = (task_id, False, f"error: {type(e).__name__}")
        try:
            outbox.send(reply)
        except (BrokenPipeError, OSError):
            return


BOOTSTRAP = r"""
import sys, types
read_fd, write_fd, package_dir, memory_mb = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
try:  # die with the parent even when stuck in C code (Linux)
    import ctypes, signal
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if memory_mb > 0:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    except Exception:
        pass
for name, path in (("oreal", package_dir), ("oreal.reward", package_dir + "/reward")):
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [path]
        module.__package__ = name
        sys.modules[name] = module
from oreal.reward._worker import serve
serve(read_fd, write_fd)
"""


if __name__ == "__main__":  # pragma: no cover - started through BOOTSTRAP
    serve(int(sys.argv[1]), int(sys.argv[2]))
