"""The dashboard's parts without a browser (issue 18): sessions and their limits, the live feed's
coalescing and its dropping of a watcher that falls behind, roles on accounts, the `ui:` config checks,
and the OpenAPI description of the real app."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from bootd.admins import Accounts, AdminError
from bootd.config import parse_config
from bootd.daemon import Context
from bootd.hostfeed import HostFeed
from bootd.state import open_state
from bootd.ui.sessions import SessionBook

ROOT = Path(__file__).resolve().parents[2]
PC1, PC2, PC3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"
CONFIG = f"""
groups: [{{name: room1}}]
hosts:
  - {{mac: "{PC1}", name: pc01, group: room1}}
  - {{mac: "{PC2}", name: pc02, group: room1}}
  - {{mac: "{PC3}", name: pc03, group: room1}}
"""


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def test_sessions_end_when_idle_at_their_age_limit_and_at_logout():
    clock = Clock()
    book = SessionBook(idle=60, max_age=300, clock=clock)
    s = book.create("alice")
    assert len(s.id) >= 40 and s.csrf != s.id
    clock.now += 59
    assert book.get(s.id) is s  # a request restarts the idle clock
    clock.now += 59
    assert book.get(s.id) is s
    clock.now += 61
    assert book.get(s.id) is None  # idle too long
    s = book.create("alice")
    for _ in range(7):
        clock.now += 50
        book.get(s.id)
    assert book.get(s.id) is None  # busy, but older than max_age
    s, t = book.create("alice"), book.create("bob")
    assert book.csrf_ok(s, s.csrf) and not book.csrf_ok(s, t.csrf) and not book.csrf_ok(s, None)
    assert book.drop_user("alice") == 1 and book.get(s.id) is None and book.get(t.id) is t
    book.drop(t.id)
    assert book.get(t.id) is None and book.get("") is None and book.get("made-up") is None


def test_sessions_stay_bounded():
    book = SessionBook(idle=60, max_age=300, clock=Clock(), max_sessions=100)
    first = book.create("a")
    for _ in range(500):
        book.create("a")
    assert len(book) == 100 and book.get(first.id) is None


def test_roles_on_accounts(store):
    acc = Accounts(store, PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1))
    acc.add("alice", "correct horse", by="root")
    acc.add("victor", "correct horse", by="root", role="viewer")
    assert {a["name"]: a["role"] for a in acc.list()} == {"alice": "admin", "victor": "viewer"}
    with pytest.raises(AdminError, match="bad role"):
        acc.add("eve", "correct horse", by="root", role="root")
    acc.set_role("victor", "admin")
    assert acc.role("victor") == "admin"
    with pytest.raises(AdminError, match="no admin"):
        acc.set_role("nobody", "viewer")
    acc.remove("victor")
    assert acc.role("victor") is None and acc.role("Robert'); DROP") is None


def _check(tmp_path, text: str) -> tuple[int, str]:
    path = tmp_path / "bootd.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "--config", str(path), "check-config"],
                       capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stdout + r.stderr


def test_ui_config_is_checked_with_file_line_and_field(tmp_path):
    rc, out = _check(tmp_path, "ui:\n  listen: 10.0.0.1:8443\n")
    assert rc == 1 and "bootd.yaml:2 ui.listen: 10.0.0.1:8443 is not loopback: set tls_cert and tls_key" in out, out
    rc, out = _check(tmp_path, "ui:\n  listen: 127.0.0.1:8081\n  tls_cert: /etc/bootd/ui.crt\n")  # no key
    assert rc == 1 and "tls_cert and tls_key go together" in out, out
    rc, out = _check(tmp_path, "ui:\n  listen: nonsense\n")
    assert rc == 1 and "ui.listen" in out and "HOST:PORT" in out, out
    assert _check(tmp_path, "ui:\n  listen: 127.0.0.1:8081\n  behind_proxy: true\n")[0] == 0


def _ctx(store) -> Context:
    return Context(config=parse_config(CONFIG), config_path="test", store=store)


def test_the_feed_sends_only_changed_tiles_once_per_tick_and_drops_a_watcher_that_lags(store):
    async def run() -> None:
        ctx = _ctx(store)
        feed = HostFeed(tick=0.05, sweep=60.0)
        await feed.start(ctx)
        try:
            w, tiles = await feed.watch()
            assert {t["mac"]: t["state"] for t in tiles} == {PC1: "off", PC2: "off", PC3: "off"}
            # a burst of events of two PCs, one written from another thread (TFTP's workers do that)
            store.record_event(PC1, "dhcp", {"type": "request"})
            store.record_event(PC1, "loader", {"path": "ipxe.efi", "proto": "tftp"})
            t = threading.Thread(target=store.record_event, args=(PC2, "dhcp", {"type": "discover"}))
            t.start()
            t.join()
            changed = await asyncio.wait_for(w.queue.get(), 2)
            assert {c["mac"]: (c["state"], c["step"]) for c in changed} == {
                PC1: ("booting", "loader ipxe"), PC2: ("booting", "dhcp")}
            assert w.queue.empty()  # one message for the burst
            store.record_event(PC1, "loader", {"path": "ipxe.efi", "proto": "tftp"})  # nothing new to show
            await asyncio.sleep(0.3)
            assert w.queue.empty()
            # a watcher that reads nothing falls behind and is dropped: its stream ends, the browser reconnects
            slow, _ = await feed.watch()
            for i in range(300):
                store.record_event(PC3, "kernel" if i % 2 else "initrd", {"path": f"k{i}", "proto": "http"},
                                   nbytes=i + 1)
                await asyncio.sleep(0.052 if i < 3 else 0)
                if slow.dropped:
                    break
                feed.publish([{"mac": PC3, "n": i}])  # as if each tick had news
                while not w.queue.empty():  # the other watcher keeps up
                    w.queue.get_nowait()
            assert slow.dropped and slow not in feed.watchers and slow.queue.get_nowait() is None
            assert feed.counts["watchers_dropped"] == 1 and w in feed.watchers
        finally:
            await feed.stop()
        assert not feed.watchers and feed._on_event not in store.event_listeners
    asyncio.run(run())


def test_the_openapi_description_of_the_real_app_is_valid_and_complete(store):
    from openapi_spec_validator import validate

    from bootd.http.app import HttpService
    from bootd.http.openapi import describe
    app = HttpService()._make_app(_ctx(store))
    doc = describe(app)
    validate(doc)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/v1/") and r.method != "HEAD"}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert {(m, p.replace("{path:.+}", "{path}")) for m, p in routes} == described
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) and len(ids) > 50
    assert doc["paths"]["/api/v1/audit"]["get"]["summary"].startswith("Who changed what")
