"""The adapter's batch path without the network: replies leave only after their leases are committed."""
from __future__ import annotations

import socket

import pytest
import yaml

from bootd.config import parse_config
from bootd.dhcp.codec import DhcpMessage, decode, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.server import DhcpService
from bootd.metrics import Metrics
from bootd.state import open_state
from bootd.udpbatch import send_each


class FakeSocket:
    """Stands in for the UDP socket: a queue of datagrams to read, a list of what was sent."""

    def __init__(self, datagrams):
        self.inbox = list(datagrams)
        self.sent = []


    def recvmsg(self, n, ancbufsize=0):  # as the kernel gives it without a timestamp: "now"
        data, src = self.recvfrom(n)
        return data, [], 0, src
    def recvfrom(self, n):
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.pop(0)[:n], ("10.80.0.2", 67)

    def sendto(self, data, dest):
        self.sent.append((decode(data), dest))


class Ctx:
    def __init__(self, tmp_path):
        self.config = parse_config(yaml.safe_dump({
            "interfaces": [{"name": "br0", "address": "10.80.0.1/16"}],
            "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.80.0.10", "end": "10.80.0.250"}]}}))
        self.store = open_state(tmp_path / "state.db")
        self.metrics = Metrics()
        self.cluster = None  # one server: it answers DHCP


@pytest.fixture
def svc(tmp_path):
    s = DhcpService(send=send_each)  # the fake socket records each sendto
    s.ctx = Ctx(tmp_path)
    s.leases = LeaseTable(s.ctx.store)
    s._build_policy()
    yield s
    s.ctx.store.close()


def discover(i):
    return encode(DhcpMessage(xid=i, chaddr=(0x0c0100000000 + i).to_bytes(6, "big"), giaddr="10.80.0.2",
                              options={53: b"\x01"}))


def request(i, ip):
    return encode(DhcpMessage(xid=i, chaddr=(0x0c0100000000 + i).to_bytes(6, "big"), giaddr="10.80.0.2",
                              options={53: b"\x03", 50: socket.inet_aton(ip), 54: socket.inet_aton("10.80.0.1")}))


def test_a_burst_is_one_commit_and_every_ack_follows_its_lease(svc):
    sock = FakeSocket([discover(i) for i in range(40)] + [b"garbage" * 3])
    svc._on_readable(sock, "br0", 67)
    offers = [m for m, _ in sock.sent]
    assert len(offers) == 40 and all(m.message_type == 2 for m in offers)
    assert {d for _, d in sock.sent} == {("10.80.0.2", 67)}
    sock = FakeSocket([request(m.xid, m.yiaddr) for m in offers])
    svc._on_readable(sock, "br0", 67)
    acks = [m for m, _ in sock.sent]
    assert len(acks) == 40 and all(m.message_type == 5 for m in acks)
    rows = {r["ip"]: r["mac"] for r in svc.ctx.store.query("SELECT ip, mac FROM leases WHERE state='bound'")}
    assert rows == {m.yiaddr: m.mac for m in acks}
    snap = svc.ctx.metrics.snapshot()["dhcp"]
    assert snap["received"] == 81 and snap["malformed"] == 1
    assert snap["answered{type=OFFER}"] == 40 and snap["answered{type=ACK}"] == 40


def read_only(store, on: bool) -> None:
    """Make the store's connection refuse writes (or accept them again), on either engine."""
    if store.dialect == "sqlite":
        store.conn.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")
    else:
        store.conn.execute(f"SET default_transaction_read_only = {'on' if on else 'off'}")


def test_no_ack_leaves_when_the_store_cannot_write(svc):
    sock = FakeSocket([discover(1)])
    svc._on_readable(sock, "br0", 67)
    ip = sock.sent[0][0].yiaddr
    read_only(svc.ctx.store, True)  # every write now fails
    sock = FakeSocket([request(1, ip)])
    svc._on_readable(sock, "br0", 67)
    assert sock.sent == []
    assert svc.ctx.metrics.snapshot()["dhcp"]["errors"] >= 1
    assert svc.leases.lease_for("0c:01:00:00:00:01") is None  # memory reloaded from the store
    read_only(svc.ctx.store, False)
    sock = FakeSocket([request(1, ip)])  # the client retransmits
    svc._on_readable(sock, "br0", 67)
    assert [m.message_type for m, _ in sock.sent] == [5]
    assert svc.ctx.store.query("SELECT mac FROM leases WHERE ip=?", (ip,))[0]["mac"] == "0c:01:00:00:00:01"
