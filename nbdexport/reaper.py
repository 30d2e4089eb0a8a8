"""Reaper: drops the exports of hosts that went away (not connected to the NBD port for
nbd.reap_after seconds), and tells whether a host is connected at all (for `disk list` and commits)."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Callable, Iterable, Optional

from nbdexport.connections import peers
from nbdexport.exports import ExportSet
from nbdexport.model import ExportRow

log = logging.getLogger("bootd.nbd")


class Reaper:
    """Runs `reap_once` every nbd.reap_interval seconds once started."""

    def __init__(self, exports: ExportSet, configured_ips: Callable[[str], Iterable[str]]):
        self.exports = exports
        self.configured_ips = configured_ips
        self._task: Optional[asyncio.Task[None]] = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wake(self) -> None:
        """Run the next round now (a draft was just exported: its interval is shorter)."""
        self._wake.set()

    def peer_ips(self) -> dict[str, int]:
        """{address: established connections} to the NBD port, seen in the daemon's network namespace."""
        return peers(self.exports.s.port, self.exports.qsd.pid)

    def _host_ips(self, mac: str) -> set[str]:
        """Addresses the host was seen at (lease, last address, configured one): for reaping only, to
        tell whether it is still connected; never who may open an export (that is access.py)."""
        store = self.exports.store
        ips = set(self.configured_ips(mac) or ())
        host = store.host(mac)
        if host and host.get("last_ip"):
            ips.add(host["last_ip"])
        try:
            ips.update(store.bound_ips(mac))
        except Exception:  # no lease table in a bare state file
            pass
        return ips

    def connected(self, mac: str, conn: Optional[dict[str, int]] = None) -> bool:
        conn = self.peer_ips() if conn is None else conn
        return any(conn.get(ip) for ip in self._host_ips(mac))

    async def reap_once(self, now: Optional[float] = None) -> list[str]:
        """Drop exports of hosts that went away: not connected for `reap_after` seconds since their
        boot or their last seen connection. Returns the MACs reaped."""
        ex = self.exports
        now = time.time() if now is None else now
        ex.space()
        conn = self.peer_ips()
        by_mac: dict[str, list[ExportRow]] = {}
        for r in ex.rows.values():
            by_mac.setdefault(r.mac, []).append(r)
        reaped = []
        for mac, rows in by_mac.items():
            if self.connected(mac, conn):
                for r in rows:
                    r.last_active = now
                    r.opened = True
                try:
                    ex.tables.touch_exports(mac, now)
                except sqlite3.Error as e:  # a full filesystem: reaping must still go on (it frees space)
                    log.warning("cannot store the last activity of %s: %s", mac, e)
                continue
            released = await self.release_drafts(mac, lambda r: r.opened and
                                                 now - r.last_active >= ex.s.maintenance_release_after)
            rows = [r for r in rows if r not in released]
            if not rows or now - max(r.last_active for r in rows) < ex.s.reap_after:
                continue
            gone_for = now - max(r.last_active for r in rows)
            async with ex.mac_lock(mac):
                rows = ex.of_mac(mac)  # what is left once the lock is ours (may be nothing)
                for r in rows:  # the file first, then the row: on a full filesystem only that order works
                    ex.forget(r, stored=False)
                    await ex.teardown(r, delete_file=not r.persistent)
                ex.tables.drop_exports([r.name for r in rows])
            reaped.append(mac)
            ex.inc("reaped")
            log.info("reaped the disk of %s (gone for %.0f s)", mac, gone_for)
        return reaped

    async def release_drafts(self, mac: str, which: Callable[[ExportRow], bool] = lambda r: True) -> list[ExportRow]:
        """Drop `mac`'s exports of a maintenance draft (those `which` picks): the draft file stays (it is the
        snapshot store's), only the export goes, so the draft can be sealed. Returns the rows dropped."""
        ex = self.exports
        async with ex.mac_lock(mac):
            rows = [r for r in ex.of_mac(mac) if r.is_draft and which(r)]
            for r in rows:
                ex.forget(r)
                await ex.teardown(r, delete_file=False)
                ex.inc("maintenance_released")
                log.info("released the draft export of %s (%s)", mac, r.snap.name)
                ex.store.record_event(mac, "disk", {"action": "draft-released", "snapshot": r.snap.name})
        return rows

    async def release_gone_drafts(self) -> list[str]:
        """At start-up: drafts whose host is not connected now are released at once (a bootd restart
        must not leave a draft unsealable for nbd.reap_after). Returns the MACs."""
        conn = self.peer_ips()
        macs = sorted({r.mac for r in self.exports.rows.values() if r.is_draft})
        return [mac for mac in macs if not self.connected(mac, conn) and await self.release_drafts(mac)]

    def _interval(self) -> float:
        """nbd.reap_interval; shorter while a draft is exported, so its release follows a shutdown closely."""
        s = self.exports.s
        if any(r.is_draft for r in self.exports.rows.values()):
            return min(s.reap_interval, max(0.5, s.maintenance_release_after / 4))
        return s.reap_interval

    async def _loop(self) -> None:
        while True:
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("reaper: %s", e)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval())
            except asyncio.TimeoutError:
                pass
