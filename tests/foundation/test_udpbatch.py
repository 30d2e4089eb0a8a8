"""bootd/udpbatch.py: many datagrams in one sendmmsg(2), on real loopback sockets."""
from __future__ import annotations

import errno
import socket

import pytest

from bootd import udpbatch
from bootd.udpbatch import send_each, send_many


@pytest.fixture
def receivers():
    socks = []
    for _ in range(3):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        r.bind(("127.0.0.1", 0))
        r.settimeout(2.0)
        socks.append(r)
    yield socks
    for r in socks:
        r.close()


def drain(r: socket.socket, n: int) -> list[bytes]:
    return [r.recv(2048) for _ in range(n)]


def test_sendmmsg_is_there():
    assert udpbatch._sendmmsg is not None  # glibc on Linux: the batched path is the one under test


@pytest.mark.parametrize("send", [send_many, send_each])
def test_every_datagram_arrives_in_order_at_its_destination(receivers, send):
    out = [(f"datagram {i:04d}".encode() * (1 + i % 7), receivers[i % 3].getsockname()) for i in range(300)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert send(s, out) == [None] * 300
    finally:
        s.close()
    for k, r in enumerate(receivers):
        assert drain(r, 100) == [p for i, (p, _) in enumerate(out) if i % 3 == k]


@pytest.mark.parametrize("send", [send_many, send_each])
def test_a_refused_datagram_costs_only_itself(receivers, send):
    """Broadcast without SO_BROADCAST is refused by the kernel (EACCES) before anything leaves."""
    dest = receivers[0].getsockname()
    out = [(b"a", dest), (b"b", dest), (b"refused", ("255.255.255.255", 9)), (b"c", dest)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert send(s, out) == [None, None, errno.EACCES, None]
    finally:
        s.close()
    assert drain(receivers[0], 3) == [b"a", b"b", b"c"]


def test_nothing_to_send():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert send_many(s, []) == []
    finally:
        s.close()
