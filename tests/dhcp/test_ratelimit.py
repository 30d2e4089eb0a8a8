"""Admission before decoding (issue 13, point 8): token buckets with an explicit clock, and the adapter
answering known MACs first while strangers get only their budget. No network: a fake socket."""
from __future__ import annotations

import yaml

from bootd.config import parse_config
from bootd.dhcp.codec import DhcpMessage, decode, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.ratelimit import Admission, KeyedBuckets
from bootd.dhcp.server import DhcpService
from bootd.metrics import Metrics
from bootd.state import open_state
from bootd.udpbatch import send_each

T0 = 1_800_000_000.0
RESERVED = "52:54:00:aa:00:01"


def test_per_mac_bucket_gives_the_burst_then_the_rate():
    b = KeyedBuckets(rate=10, burst=5)
    got = [b.take(b"\x02" * 6, T0) for _ in range(8)]
    assert got == [True] * 5 + [False] * 3
    later = [b.take(b"\x02" * 6, T0 + 0.25) for _ in range(3)]
    assert later == [True, True, False]  # 10/s: 2.5 more after 0.25 s
    assert b.take(b"\x03" * 6, T0)  # another MAC has its own bucket


def test_per_mac_buckets_stay_bounded_under_random_macs():
    b = KeyedBuckets(rate=10, burst=5, max_tracked=1000)
    for i in range(50_000):
        b.take(i.to_bytes(6, "big"), T0 + i * 1e-4)
        assert len(b.buckets) <= 1000


def test_strangers_budgets_refill_with_time_and_may_go_into_debt():
    a = Admission(per_mac=50, per_mac_burst=100, unknown_cpu=0.5, unknown_answers=10, unknown_answers_burst=3, now=T0)
    assert a.strangers_may_work(T0) is None
    a.charge_strangers(0.9)  # one dear batch: 0.4 s of debt
    assert a.strangers_may_work(T0) == "overload"
    assert a.strangers_may_work(T0 + 0.7) == "overload"
    assert a.strangers_may_work(T0 + 0.9) is None  # paid back at 0.5 s/s
    a.charge_strangers(0.0, answers=3)
    assert a.strangers_may_work(T0 + 0.9) == "unknown-budget"
    assert a.strangers_may_work(T0 + 1.05) is None  # 10 answers/s: one more after 0.1 s


class Ctx:
    def __init__(self, tmp_path):
        self.config = parse_config(yaml.safe_dump({
            "interfaces": [{"name": "br0", "address": "10.80.0.1/16"}],
            "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.80.1.1", "end": "10.80.200.250"}],
                     "rate_limit": {"per_mac": 50, "per_mac_burst": 100, "unknown_answers": 100,
                                    "unknown_answers_burst": 200}},
            "hosts": [{"mac": RESERVED, "name": "pc1", "ip": "10.80.0.33"}]}))
        self.store = open_state(tmp_path / "state.db")
        self.metrics = Metrics()
        self.cluster = None  # one server: it answers DHCP


class Socket:
    def __init__(self, datagrams):
        self.inbox = list(datagrams)
        self.sent = []


    def recvmsg(self, n, ancbufsize=0):  # as the kernel gives it without a timestamp: "now"
        data, src = self.recvfrom(n)
        return data, [], 0, src
    def recvfrom(self, n):
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.pop(0)[:n], ("0.0.0.0", 68)

    def sendto(self, data, dest):
        self.sent.append(decode(data))


def discover(mac: bytes, xid: int) -> bytes:
    return encode(DhcpMessage(xid=xid, flags=0x8000, chaddr=mac, options={53: b"\x01"}))


def service(tmp_path, clock):
    s = DhcpService(clock=lambda: clock[0], send=send_each)
    s.ctx = Ctx(tmp_path)
    s.leases = LeaseTable(s.ctx.store)
    s._build_policy()
    return s


def test_a_flood_of_strangers_cannot_crowd_out_a_known_host(tmp_path):
    clock = [T0]
    svc = service(tmp_path, clock)
    reserved = bytes.fromhex(RESERVED.replace(":", ""))
    offers_to = []
    for second in range(5):  # 5 s of 1000 strangers a second, the reserved host last in every batch
        for batch in range(4):
            flood = [discover((0x020000000000 + second * 10_000 + batch * 1000 + i).to_bytes(6, "big"), i)
                     for i in range(255)]
            sock = Socket(flood + [discover(reserved, 0xabc)])
            svc._on_readable(sock, "br0", 67)
            offers_to += [m.mac for m in sock.sent]
            clock[0] += 0.25
    assert offers_to.count(RESERVED) == 20  # every one of its DISCOVERs was answered
    strangers = len(offers_to) - 20
    assert strangers <= 200 + 100 * 5 + 1  # the burst and 100 answers a second, not 5 000
    m = svc.ctx.metrics.snapshot()["dhcp"]
    assert m["dropped{reason=unknown-budget}"] >= 5 * 1020 - 20 - strangers - 1
    assert len(svc.leases.offers) == strangers + 1  # and no more state than answers
    svc.ctx.store.close()


def test_one_mac_flooding_is_cut_to_its_rate_and_others_still_get_answers(tmp_path):
    clock = [T0]
    svc = service(tmp_path, clock)
    loud = bytes.fromhex("525400aa0002")
    quiet = bytes.fromhex("525400aa0003")
    answered_loud = answered_quiet = 0
    for tick in range(10):  # 1 s: the loud MAC sends 250 packets every 0.1 s, the quiet one 1
        sock = Socket([discover(loud, tick * 1000 + i) for i in range(250)] + [discover(quiet, tick)])
        svc._on_readable(sock, "br0", 67)
        answered_loud += sum(m.mac == "52:54:00:aa:00:02" for m in sock.sent)
        answered_quiet += sum(m.mac == "52:54:00:aa:00:03" for m in sock.sent)
        clock[0] += 0.1
    assert answered_quiet == 10
    assert answered_loud <= 100 + 50 * 1 + 1  # its burst and 50/s
    assert svc.ctx.metrics.snapshot()["dhcp"]["dropped{reason=rate-limit}"] >= 2500 - 151
    svc.ctx.store.close()
