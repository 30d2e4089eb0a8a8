"""The boot-event log stays bounded (issue 13, point 9): retention, a row cap, repeats coalesced, and
host rows of MACs seen once go with their events. Explicit clocks, a real SQLite file."""
from __future__ import annotations

import yaml

from bootd.config import parse_config
from bootd.dhcp.codec import DhcpMessage, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.server import DhcpService
from bootd.metrics import Metrics
from bootd.state import StateStore, open_state
from bootd.udpbatch import send_each

T0 = 1_800_000_000.0
DAY = 86400.0


def rows(store: StateStore, table: str = "boot_events") -> int:
    return store.query(f"SELECT count(*) FROM {table}")[0][0]


def test_row_cap_holds_after_every_insert_and_keeps_the_newest(tmp_path):
    store = open_state(tmp_path / "state.db")
    store.set_event_limits(retention=7 * DAY, max_rows=1000, coalesce=60)
    for i in range(20_000):
        mac = "02:00:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255)
        store.record_event(mac, "dhcp", {"type": "DISCOVER", "n": i}, ts=T0 + i * 0.001)
        store.touch_host(mac, now=T0 + i * 0.001)
        if i % 97 == 0:
            assert rows(store) <= 1000
    assert 900 <= rows(store) <= 1000
    newest = store.events(limit=1)[0]
    assert newest["detail"]["n"] == 19_999
    oldest = store.query("SELECT id, detail FROM boot_events ORDER BY id LIMIT 1")[0]
    assert '"n": 19' in oldest["detail"]  # only the last thousand or so are left
    assert rows(store, "hosts") <= 1000  # host rows of MACs whose events are gone went with them
    store.close()


def test_retention_prunes_on_insert_and_when_idle(tmp_path):
    store = open_state(tmp_path / "state.db")
    store.set_event_limits(retention=7 * DAY, max_rows=200_000, coalesce=60)
    for i in range(500):
        store.record_event("52:54:00:00:00:01", "loader", {"n": i}, ts=T0 + i)
    store.touch_host("52:54:00:00:00:01", now=T0)
    store.record_event("52:54:00:00:00:02", "loader", {"n": "new"}, ts=T0 + 8 * DAY)
    left = store.events(limit=1000)
    assert [e["mac"] for e in left] == ["52:54:00:00:00:02"]
    assert store.host("52:54:00:00:00:01") is None  # nothing left about it: forgotten
    # no inserts at all: the periodic call ages the log out as well
    assert store.enforce_event_limits(T0 + 16 * DAY) == 1
    assert rows(store) == 0
    store.close()


def test_repeats_of_a_hosts_last_event_count_on_one_row(tmp_path):
    store = open_state(tmp_path / "state.db")
    store.set_event_limits(retention=7 * DAY, max_rows=1000, coalesce=60)
    mac = "52:54:00:00:00:03"
    for i in range(50):  # a PC retrying DHCP for 49 s
        store.record_event(mac, "dhcp", {"type": "DISCOVER", "offered": "10.0.0.5"}, ts=T0 + i)
    [ev] = store.events(mac)
    assert ev["count"] == 50 and ev["ts"] == T0 and ev["last_ts"] == T0 + 49
    store.record_event(mac, "dhcp", {"type": "REQUEST", "ip": "10.0.0.5"}, ts=T0 + 50)
    store.record_event(mac, "dhcp", {"type": "DISCOVER", "offered": "10.0.0.5"}, ts=T0 + 51)  # not a repeat now
    store.record_event(mac, "dhcp", {"type": "DISCOVER", "offered": "10.0.0.5"}, ts=T0 + 200)  # past the window
    assert [(e["detail"]["type"], e["count"]) for e in store.events(mac)] == \
        [("DISCOVER", 50), ("REQUEST", 1), ("DISCOVER", 1), ("DISCOVER", 1)]
    store.close()


class Ctx:
    def __init__(self, tmp_path, max_rows: int):
        self.config = parse_config(yaml.safe_dump({
            "interfaces": [{"name": "br0", "address": "10.80.0.1/16"}],
            "dhcp": {"mode": "proxy",  # every stranger answered: here the store's cap is what bounds
                     "rate_limit": {"unknown_cpu": 1.0, "unknown_answers": 1e6, "unknown_answers_burst": 1000000}},
            "events": {"max_rows": max_rows}}))
        self.store = open_state(tmp_path / "state.db")
        self.metrics = Metrics()
        self.cluster = None  # one server: it answers DHCP


class FloodSocket:
    """Stands in for the UDP socket: PXE DISCOVERs from a new MAC each, what was sent is only counted."""

    def __init__(self, first: int, n: int):
        self.todo = iter(range(first, first + n))
        self.sent = 0


    def recvmsg(self, size, ancbufsize=0):  # as the kernel gives it without a timestamp: "now"
        data, src = self.recvfrom(size)
        return data, [], 0, src
    def recvfrom(self, size):
        i = next(self.todo, None)
        if i is None:
            raise BlockingIOError
        msg = DhcpMessage(xid=i, flags=0x8000, chaddr=(0x020000000000 + i).to_bytes(6, "big"),
                          options={53: b"\x01", 60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00"})
        return encode(msg)[:size], ("0.0.0.0", 68)

    def sendto(self, data, dest):
        self.sent += 1


def test_a_flood_of_random_macs_in_proxy_mode_leaves_state_db_bounded(tmp_path):
    clock = [T0]
    svc = DhcpService(clock=lambda: clock[0], send=send_each)
    svc.ctx = Ctx(tmp_path, max_rows=2000)
    svc.leases = LeaseTable(svc.ctx.store)
    svc._build_policy()
    svc._apply_event_limits()
    store = svc.ctx.store
    sizes = []
    for k in range(60):  # 60 x 1000 answered PXE DISCOVERs, 60 000 MACs, over 60 s
        sock = FloodSocket(k * 1000, 1000)
        while True:
            before = sock.sent
            svc._on_readable(sock, "br0", 67)
            if sock.sent == before:
                break
        clock[0] += 1.0
        assert rows(store) <= 2000 and rows(store, "hosts") <= 2000
        sizes.append(sum(p.stat().st_size for p in tmp_path.glob("state.db*")))
    assert svc.ctx.metrics.snapshot()["dhcp"]["answered{type=OFFER}"] == 60_000
    assert max(sizes) < 6 << 20, sizes  # with the WAL; 60 000 rows of events and hosts were ~25 MB
    store.close()
