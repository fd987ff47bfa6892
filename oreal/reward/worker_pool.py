"""Killable worker processes that run `equivalence.compare` under a hard per-item timeout.

sympy (and Python's own big-integer arithmetic) can spin in C code that no signal interrupts, so
the only dependable limit is a separate process that is killed when its time is up and replaced.

Each worker is a fresh interpreter (`subprocess`, the equivalent of multiprocessing's 'spawn')
that imports only sympy, mpmath and this package's pure modules, never `oreal/__init__` and its
torch import: a worker starts in about half a second and uses tens of MB. Workers talk over two
pipes; a task is handed to an idle worker, and a worker that misses its deadline is killed
(SIGKILL), its item answered `timeout`, and a replacement started in the background while the other
workers carry on. Workers also die with their parent (PR_SET_PDEATHSIG) and run under an address
space limit (`memory_limit_mb`) so a runaway allocation ends in MemoryError, not in swapping.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

from oreal.reward._worker import BOOTSTRAP
from oreal.reward.fastpath import DEFAULT_DECIMAL_POLICY, check_decimal_policy

log = logging.getLogger(__name__)

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_ALL_POOLS: "weakref.WeakSet[JudgePool]" = weakref.WeakSet()


MAX_TIMEOUT_S = 24 * 3600.0


def check_timeout(timeout, name: str = "timeout") -> float:
    """A time limit in seconds: a finite number in (0, one day]; ValueError naming `name` otherwise.

    NaN, infinity and absurdly large values are refused up front: the waits below would raise on
    them half-way through a call (OverflowError, ValueError) or never end.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}")
    return float(timeout)


class WorkerStartError(RuntimeError):
    """No judge worker process could be started (broken Python environment, missing sympy...)."""


class _Worker:
    __slots__ = ("proc", "inbox", "outbox", "ready", "task", "deadline", "spawned_at")

    def __init__(self, memory_limit_mb: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP, str(to_child_r), str(from_child_w), _PACKAGE_DIR,
                 str(memory_limit_mb)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        self.inbox = Connection(to_child_w, readable=False)  # what the worker reads
        self.outbox = Connection(from_child_r, writable=False)  # what the worker writes
        self.ready = False
        self.task = None
        self.deadline = 0.0
        self.spawned_at = time.monotonic()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for conn in (self.inbox, self.outbox):
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
            pass

    def stop(self) -> None:
        """Ask politely (the worker exits on None), then kill."""
        try:
            self.inbox.send(None)
            self.proc.wait(timeout=0.5)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        self.kill()


class JudgePool:
    """A pool of `num_workers` judge worker processes.

    `compare_many(pairs, timeout)` answers every (pred, gold) pair exactly once, in order, each
    either `(equal, reason)` from a worker or `(False, "timeout")` when its worker ran past
    `timeout` seconds and was killed. `compare(pred, gold, timeout)` answers one pair within
    `timeout` seconds of wall time, waiting for a worker included (except the very first start).
    Thread-safe (calls are serialised); after `os.fork()` the child gets fresh workers.
    """

    def __init__(self, num_workers: int | None = None, *, startup_timeout: float = 120.0,
                 memory_limit_mb: int = 4096):
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers or max(1, min(os.cpu_count() or 1, 8))
        self.startup_timeout = startup_timeout
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ever_ready = False
        self.timeouts = 0
        self.restarts = 0
        _ALL_POOLS.add(self)

    # -- lifecycle
    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # inherited from a parent process: those workers are not ours
            self._workers = []
            self._pid = os.getpid()
            self._ever_ready = False

    def _fill(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        try:
            return _Worker(self.memory_limit_mb)
        except OSError as e:
            raise WorkerStartError(f"cannot start a judge worker ({sys.executable}): {e}") from e

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self.restarts += 1
        self._workers.append(self._spawn())

    @contextlib.contextmanager
    def _no_worker_left_busy(self):
        """Around a call: a worker still holding a task when the call ends in an exception (Ctrl-C,
        a failing progress callback) is killed; its late answer would belong to nobody, and a worker
        marked busy would never be handed work again."""
        try:
            yield
        except BaseException:
            for w in [w for w in self._workers if w.task is not None]:
                w.kill()
                self._workers.remove(w)
                self.restarts += 1
            raise

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for w in self._workers:
                    w.stop()
            self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- messages
    def _receive(self, worker: _Worker):
        """One message from `worker`, or None if it died (the worker is then replaced)."""
        try:
            return worker.outbox.recv()
        except (EOFError, OSError):
            return None

    def _wait_ready(self, until: float) -> bool:
        """Wait for any worker to become ready, until the monotonic time `until`."""
        while True:
            pending = [w for w in self._workers if not w.ready]
            if len(pending) < len(self._workers):
                return True
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            for conn in wait([w.outbox for w in pending], timeout=remaining):
                worker = next(w for w in pending if w.outbox is conn)
                message = self._receive(worker)
                if message is None:
                    code = worker.proc.poll()
                    self._replace(worker)
                    if time.monotonic() - worker.spawned_at < 1.0 and code not in (None, -9):
                        raise WorkerStartError(f"judge worker exited at start with code {code}; "
                                               f"is sympy importable by {sys.executable}?")
                elif message[0] == "ready":
                    worker.ready = True
                    self._ever_ready = True

    # -- public API
    def compare_many(self, pairs, timeout: float, progress=None,
                     decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> list[tuple[bool, str]]:
        """Verdicts for (pred, gold) string pairs, each under a hard `timeout` in seconds
        (`decimal_policy`: see `fastpath.py`)."""
        check_decimal_policy(decimal_policy)
        timeout = check_timeout(timeout)
        pairs = list(pairs)
        results: list = [None] * len(pairs)
        if not pairs:
            return []
        with self._lock, self._no_worker_left_busy():
            self._check_fork()
            self._fill()
            queue = deque(range(len(pairs)))
            retried: set[int] = set()
            done = 0
            while done < len(pairs):
                now = time.monotonic()
                for w in self._workers:
                    if w.ready and w.task is None and queue:
                        index = queue.popleft()
                        try:
                            w.inbox.send((index, pairs[index][0], pairs[index][1], decimal_policy))
                        except (OSError, ValueError):
                            queue.appendleft(index)
                            self._replace(w)
                            break
                        w.task, w.deadline = index, now + timeout
                busy = [w for w in self._workers if w.task is not None]
                if not busy and not any(w.ready for w in self._workers):
                    if not self._wait_ready(time.monotonic() + self.startup_timeout):
                        raise WorkerStartError(f"no judge worker became ready within {self.startup_timeout:.0f} s")
                    continue
                next_deadline = min((w.deadline for w in busy), default=now + 1.0)
                watched = [w.outbox for w in self._workers]
                for conn in wait(watched, timeout=max(0.0, next_deadline - now)):
                    worker = next((w for w in self._workers if w.outbox is conn), None)
                    if worker is None:
                        continue
                    message = self._receive(worker)
                    if message is None:  # crashed (not timed out): retry its item once elsewhere
                        index = worker.task
                        self._replace(worker)
                        if index is not None:
                            if index in retried:
                                results[index] = (False, "error: worker crashed")
                                done += 1
                                self._progress(progress)
                            else:
                                retried.add(index)
                                queue.appendleft(index)
                        continue
                    if message[0] == "ready":
                        worker.ready = True
                        self._ever_ready = True
                        continue
                    index, equal, reason = message
                    if index == worker.task and results[index] is None:
                        results[index] = (equal, reason)
                        done += 1
                        self._progress(progress)
                    worker.task = None
                now = time.monotonic()
                for w in list(self._workers):
                    if w.task is not None and now >= w.deadline:
                        results[w.task] = (False, "timeout")
                        done += 1
                        self.timeouts += 1
                        self._progress(progress)
                        log.debug("judge worker %s timed out; restarting it", w.proc.pid)
                        self._replace(w)
        return results

    @staticmethod
    def _progress(progress) -> None:
        if progress is not None:
            progress(1)

    def compare(self, pred: str, gold: str, timeout: float,
                decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> tuple[bool, str]:
        """One verdict within `timeout` seconds of wall time (the first worker start excepted)."""
        timeout = check_timeout(timeout)
        call_deadline = time.monotonic() + timeout
        with self._lock, self._no_worker_left_busy():
            self._check_fork()
            self._fill()
            if not self._ever_ready:
                if not self._wait_ready(time.monotonic() + self.startup_timeout):
                    raise WorkerStartError(f"no judge worker became ready within {self.startup_timeout:.0f} s")
                call_deadline = max(call_deadline, time.monotonic() + timeout)
            elif not self._wait_ready(call_deadline):
                return False, "timeout"
            worker = next(w for w in self._workers if w.ready and w.task is None)
            try:
                worker.inbox.send((0, pred, gold, check_decimal_policy(decimal_policy)))
            except (OSError, ValueError):
                self._replace(worker)
                return False, "error: worker crashed"
            worker.task = 0
            while True:
                remaining = call_deadline - time.monotonic()
                if remaining <= 0 or not worker.outbox.poll(remaining):
                    self.timeouts += 1
                    self._replace(worker)
                    return False, "timeout"
                message = self._receive(worker)
                if message is None:
                    self._replace(worker)
                    return False, "error: worker crashed"
                if message[0] == "ready":
                    continue
                worker.task = None
                return message[1], message[2]


def _close_all() -> None:
    for pool in list(_ALL_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001  best effort at interpreter exit
            pass


atexit.register(_close_all)
