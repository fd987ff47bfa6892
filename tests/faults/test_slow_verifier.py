"""A verifier server that drips its reply a byte at a time: each request ends at its deadline,
and the rule verdicts stand."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from oreal.reward import LLMVerifier, judge_batch

BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A"}}]}).encode()


class DrippingServer:
    """127.0.0.1 only; after the request it sends `head_now` at once, then `drip` one byte per 0.1 s.

    Bounded: each connection drips for at most 10 s, and `close()` stops every connection.
    """

    def __init__(self, head_now: bytes, drip: bytes):
        self.head_now, self.drip = head_now, drip
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket):
        with conn:
            try:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                conn.sendall(self.head_now)
                end = time.monotonic() + 10
                for i in range(len(self.drip)):
                    if self.stop.wait(0.1) or time.monotonic() > end:
                        return
                    conn.sendall(self.drip[i:i + 1])
            except OSError:  # the client hung up: what we want
                return

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(BODY)).encode() + b"\r\n\r\n")


@pytest.mark.parametrize("head_now, drip", [(HEADERS, BODY), (b"", HEADERS + BODY)],
                         ids=["body dripped", "headers dripped"])
def test_a_dripping_server_is_cut_off_at_the_deadline(head_now, drip):
    server = DrippingServer(head_now, drip)
    try:
        v = LLMVerifier(server.url, "m", timeout=0.5, retries=1, backoff=0.0)
        t0 = time.monotonic()
        assert v.verify("q", "2", "3") is None  # no verdict, although the full reply would say "A"
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"two 0.5 s requests took {elapsed:.1f} s"  # the unbounded client: ~2 x 5 s
        assert v.metrics.timeouts == 2 and v.metrics.failed == 1 and server.connections == 2
        # the rule verdicts stand: right stays right, wrong stays wrong
        t0 = time.monotonic()
        results = judge_batch([r"\boxed{2}", r"\boxed{3}"], ["2", "2"], verifier=v)
        assert [(r.correct, r.reason) for r in results] == [(True, "match"), (False, "different")]
        assert time.monotonic() - t0 < 5
    finally:
        server.close()
