"""A hostile local process: it connects to the engine's control socket before the engine does,
or pretends to be the trainer; the weight-sync store is not reachable beyond its address."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import threading
import time

import psutil
import pytest

from oreal.rollout import channel as channel_module
from oreal.rollout.channel import ADDR_ENV, TOKEN_ENV, EngineProcess, connect_from_child
from oreal.rollout.transport import GlooTransport


class _MakeDir:
    """Unpickling this creates a directory: the evidence that a stranger's bytes were deserialised."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _read_until_closed(s: socket.socket) -> bytes:
    """What the trainer sent before it closed the connection (EOF, or a reset: our bytes were unread)."""
    s.settimeout(30)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _stranger_sends_a_pickle(address, marker, answers):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        data = pickle.dumps(_MakeDir(marker)) * 4  # longer than any handshake message
        s.sendall(struct.pack("!Q", len(data)) + data)
        answers.append(_read_until_closed(s))


def _stranger_stays_silent(address, answers):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        answers.append(_read_until_closed(s))


def test_strangers_connecting_first_are_refused_unread_and_the_engine_still_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(channel_module, "HANDSHAKE_S", 1.0)
    marker = tmp_path / "unpickled"
    answers: list[bytes] = []
    strangers: list[threading.Thread] = []
    real_popen = subprocess.Popen

    def popen_after_strangers(args, **kwargs):
        # Both strangers are queued on the listener before the engine process even exists.
        address = kwargs["env"][ADDR_ENV]
        strangers.append(threading.Thread(target=_stranger_stays_silent, args=(address, answers)))
        strangers.append(threading.Thread(target=_stranger_sends_a_pickle, args=(address, marker, answers)))
        for t in strangers:
            t.start()
            time.sleep(0.2)  # connect in this order
        return real_popen(args, **kwargs)

    monkeypatch.setattr(channel_module.subprocess, "Popen", popen_after_strangers)
    t0 = time.monotonic()
    engine = EngineProcess(env=None, startup_timeout_s=120, log_path=str(tmp_path / "engine.log"))
    try:
        for t in strangers:
            t.join(30)
        assert engine.alive() and engine.channel is not None
        # both strangers were dropped after the 32-byte challenge, never told anything else
        assert sorted(len(a) for a in answers) == [32, 32]
        assert not marker.exists(), "a stranger's pickle was deserialised by the trainer"
        assert time.monotonic() - t0 < 60
        # the authenticated channel works: the engine's first message is (kind, options)
        engine.send(("no-such-engine", {}))
        _, status, payload = engine.recv(60, "while starting")
        assert status == "error" and "unknown engine kind" in payload["message"]
    finally:
        engine.kill()
    assert not marker.exists()


def test_the_engine_refuses_a_listener_that_cannot_prove_it_is_the_trainer(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setenv(ADDR_ENV, f"127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv(TOKEN_ENV, os.urandom(32).hex())

    def impostor():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(os.urandom(32))  # a challenge
            conn.recv(64)
            conn.sendall(os.urandom(32))  # a proof made without the key

    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(ConnectionRefusedError, match="not the trainer"):
        connect_from_child()
    t.join(10)
    listener.close()
    assert TOKEN_ENV not in os.environ  # the key is not passed on to processes the engine starts


def _listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_weight_sync_store_listens_on_the_requested_address_only():
    store = GlooTransport.host_store("127.0.0.1", timeout_s=10)
    try:
        assert _listening_addresses(store.port) == {"127.0.0.1"}
    finally:
        port = store.port
        del store
    deadline = time.monotonic() + 5
    while _listening_addresses(port) and time.monotonic() < deadline:  # the store owns and closes it
        time.sleep(0.05)
    assert not _listening_addresses(port)
