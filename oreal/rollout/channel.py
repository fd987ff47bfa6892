"""The control channel: an engine process started by the trainer, and framed messages to it.

The engine runs as `python -m oreal.rollout.server` in its own process session. It dials back
to a loopback socket the client listens on and both sides prove they hold a random key passed
in the engine's environment (an HMAC challenge and response each way, fixed-size raw bytes);
only then do they exchange pickled messages, each prefixed by its length. Nothing a peer sends
is unpickled before it has proved itself: another local process that connects first is
refused (its bytes are never deserialised) and the trainer keeps waiting for its engine.
Every wait on the trainer side has a deadline and watches the process: a dead engine raises
EngineDiedError (with the tail of its log), a silent one raises EngineTimeoutError and is
killed. Nothing here knows what the messages mean.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from oreal.rollout.errors import EngineDiedError, EngineTimeoutError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
ADDR_ENV = "OREAL_ENGINE_ADDR"
TOKEN_ENV = "OREAL_ENGINE_TOKEN"
_POLL_S = 0.2
_NONCE_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size
# How long a connected peer may take to answer the challenge before it is dropped as a stranger
# (the real engine answers in microseconds; a stranger holding the socket open delays us this long).
HANDSHAKE_S = 5.0


class ChannelClosed(ConnectionError):
    """The peer closed the socket."""


class Channel:
    """Length-prefixed pickles over a connected socket; `recv` takes a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(True)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def ready(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        return bool(r)

    def _read_exact(self, n: int, deadline: float | None) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if deadline is not None:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            k = self.sock.recv_into(view[got:], n - got)  # socket.timeout is a TimeoutError
            if k == 0:
                raise ChannelClosed("engine control channel closed")
            got += k
        return bytes(buf)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int, deadline: float) -> bytes:
        """Exactly `n` bytes, not deserialised (the handshake); TimeoutError after `deadline`."""
        try:
            return self._read_exact(n, deadline)
        finally:
            self.sock.settimeout(None)

    def recv(self, deadline: float | None = None) -> Any:
        """Receive one message; with a `deadline` (time.monotonic()) raise TimeoutError after it."""
        try:
            (length,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
            return pickle.loads(self._read_exact(length, deadline))
        finally:
            if deadline is not None:
                self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _mac(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + b"\0" + nonce, hashlib.sha256).digest()


def _authenticate_peer(channel: Channel, key: bytes, deadline: float) -> bool:
    """Trainer side: challenge the peer; True when it proved it holds `key` (then we prove it too)."""
    challenge = secrets.token_bytes(_NONCE_BYTES)
    channel.send_raw(challenge)
    answer = channel.recv_raw(_MAC_BYTES + _NONCE_BYTES, deadline)
    if not hmac.compare_digest(answer[:_MAC_BYTES], _mac(key, b"engine", challenge)):
        return False
    channel.send_raw(_mac(key, b"trainer", answer[_MAC_BYTES:]))
    return True


def connect_from_child() -> Channel:
    """In the engine process: dial the trainer; each side proves it holds the key before any pickle."""
    host, port = os.environ[ADDR_ENV].rsplit(":", 1)
    key = bytes.fromhex(os.environ.pop(TOKEN_ENV))  # popped: processes the engine starts never see it
    sock = socket.create_connection((host, int(port)), timeout=60)
    channel = Channel(sock)
    deadline = time.monotonic() + 60
    challenge = channel.recv_raw(_NONCE_BYTES, deadline)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    channel.send_raw(_mac(key, b"engine", challenge) + nonce)
    if not hmac.compare_digest(channel.recv_raw(_MAC_BYTES, deadline), _mac(key, b"trainer", nonce)):
        channel.close()
        raise ConnectionRefusedError(f"the process listening on {host}:{port} is not the trainer that started us")
    return channel


def _package_root() -> str:
    import oreal

    return str(Path(oreal.__file__).resolve().parent.parent)


class EngineProcess:
    """Starts `python -m oreal.rollout.server` and owns its lifetime and channel."""

    def __init__(self, *, env: dict[str, str] | None, startup_timeout_s: float, log_path: str | None = None):
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="oreal-engine-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(self.log_path, "wb")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # strangers may queue up in front of the engine
        token = secrets.token_hex(32)
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env[ADDR_ENV] = f"127.0.0.1:{listener.getsockname()[1]}"
        child_env[TOKEN_ENV] = token
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), child_env.get("PYTHONPATH", "")) if p
        )
        # Its own session: the engine (and anything it starts, such as vLLM workers) can be
        # killed as one process group, and a Ctrl-C meant for the trainer does not hit it.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oreal.rollout.server"],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.channel: Channel | None = None
        try:
            self.channel = self._accept_engine(listener, bytes.fromhex(token), startup_timeout_s)
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()

    def _accept_engine(self, listener: socket.socket, key: bytes, startup_timeout_s: float) -> Channel:
        """The first connection that proves it holds `key`; strangers are dropped, unread."""
        deadline = time.monotonic() + startup_timeout_s
        while True:
            self._check_alive("while starting")
            r, _, _ = select.select([listener], [], [], _POLL_S)
            if r:
                sock, peer = listener.accept()
                channel = Channel(sock)
                try:
                    if _authenticate_peer(channel, key, min(time.monotonic() + HANDSHAKE_S, deadline)):
                        return channel
                    why = "a wrong answer to the challenge"
                except (OSError, TimeoutError) as e:  # ChannelClosed is an OSError
                    why = f"no answer to the challenge ({type(e).__name__})"
                channel.close()
                log.warning("refused a connection to engine %s's control socket from %s:%s (%s); still waiting "
                            "for the engine", self.proc.pid, peer[0], peer[1], why)
            if time.monotonic() > deadline:
                raise EngineTimeoutError(
                    f"engine process {self.proc.pid} did not connect within {startup_timeout_s:.0f}s; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, nbytes: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(size - nbytes, 0))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _check_alive(self, doing: str) -> None:
        code = self.proc.poll()
        if code is not None:
            raise EngineDiedError(
                f"engine process {self.proc.pid} exited with code {code} {doing}; log: {self.log_path}\n"
                f"--- last lines of its log ---\n{self.log_tail()}"
            )

    def send(self, obj: Any) -> None:
        self._check_alive("before a request could be sent")
        try:
            self.channel.send(obj)
        except OSError as e:
            time.sleep(_POLL_S)
            self._check_alive("while a request was being sent")
            raise EngineDiedError(f"engine control channel failed: {e}") from e

    def recv(self, timeout_s: float, doing: str) -> Any:
        """Next message, or EngineDiedError / EngineTimeoutError (after killing the engine)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.channel.ready(min(_POLL_S, max(deadline - time.monotonic(), 0.0))):
                try:
                    # A message has started: allow its body as long as the deadline, at least 60 s.
                    return self.channel.recv(deadline=max(deadline, time.monotonic() + 60))
                except TimeoutError:
                    self.kill()
                    raise EngineTimeoutError(
                        f"engine process {self.proc.pid} stopped half-way through a message {doing}; it was killed"
                    ) from None
                except (ChannelClosed, OSError) as e:
                    try:  # a closed channel usually means the process is exiting: give it a moment
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    self._check_alive(doing)
                    raise EngineDiedError(f"engine control channel closed {doing}: {e}") from e
            self._check_alive(doing)
            if time.monotonic() >= deadline:
                self.kill()
                raise EngineTimeoutError(
                    f"engine process {self.proc.pid} did not answer within {timeout_s:.1f}s {doing}; it was killed. "
                    f"log: {self.log_path}"
                )

    def kill(self) -> None:
        """Kill the engine's whole process group (only processes we started) and reap it."""
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def discard_log(self) -> None:
        """Delete the log file if we created it (after a clean shutdown nobody needs it)."""
        if self._own_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the engine to exit; kill it if it does not within `timeout_s`."""
        if self.alive() and self.channel is not None:
            try:
                self.channel.send(("shutdown", 0, {}))
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
