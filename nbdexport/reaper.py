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

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

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
                try:
                    ex.tables.touch_exports(mac, now)
                except sqlite3.Error as e:  # a full filesystem: reaping must still go on (it frees space)
                    log.warning("cannot store the last activity of %s: %s", mac, e)
                continue
            if now - max(r.last_active for r in rows) < ex.s.reap_after:
                continue
            async with ex.mac_lock(mac):
                rows = ex.of_mac(mac)
                for r in rows:  # the file first, then the row: on a full filesystem only that order works
                    ex.forget(r, stored=False)
                    await ex.teardown(r, delete_file=not r.persistent)
                ex.tables.drop_exports([r.name for r in rows])
            reaped.append(mac)
            ex.inc("reaped")
            log.info("reaped the disk of %s (gone for %.0f s)", mac, now - max(r.last_active for r in rows))
        return reaped

    async def _loop(self) -> None:
        while True:
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("reaper: %s", e)
            await asyncio.sleep(self.exports.s.reap_interval)
