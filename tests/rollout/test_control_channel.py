"""The framed control channel: round trips, and a message cut off half-way times out."""

import socket
import struct
import time

import pytest

from oreal.rollout.channel import Channel, ChannelClosed


def test_round_trip_and_deadline_on_a_half_sent_message():
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    payload = {"prompts": [[1, 2, 3]] * 1000, "text": "x" * 100_000}
    left.send(("generate", 7, payload))
    assert right.ready(1.0)
    assert right.recv(deadline=time.monotonic() + 5) == ("generate", 7, payload)
    assert not right.ready(0.05)

    a.sendall(struct.pack("!Q", 1000) + b"only part of it")  # a sender that stops mid-message
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        right.recv(deadline=time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 3

    c, d = socket.socketpair()
    c.close()
    with pytest.raises(ChannelClosed):
        Channel(d).recv(deadline=time.monotonic() + 1)
    for s in (a, b, d):
        s.close()
