"""The live view of every PC's tile (state, current step, snapshot, last boot) for the dashboard's Rooms
page, pushed to its server-sent-event streams.

Boot events mark their MAC dirty (a StateStore event listener: cheap and thread-safe, TFTP or DHCP may
write from a worker). Every `tick` seconds, while anyone watches, the dirty PCs' tiles are computed again
through bootd/hoststate.py (the one place that says booting/up/failed/off) and the tiles that changed go
out as one message to every watcher: 300 PCs booting at once cost one message per tick, not one per
event per watcher. A sweep of every PC each `sweep` seconds catches what no event announces (an NBD
client connecting, a boot going quiet). A watcher that falls `queue_size` messages behind is dropped;
its browser reconnects and starts from the full picture.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from bootd.hoststate import disk_connections, host_rows, with_state
from bootd.service import Service, cancel_and_wait

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.feed")

TILE_FIELDS = ("mac", "name", "group", "state", "step", "snapshot", "boot_started", "last_boot_duration",
               "last_error")


def tile_of(host: dict) -> dict:
    """What a PC's tile shows, from a hoststate row."""
    return {k: host.get(k) for k in TILE_FIELDS}


@dataclass(eq=False)  # compared and hashed by identity: kept in a set
class Watcher:
    """One open stream: the messages (lists of changed tiles) it has not sent yet."""

    queue: asyncio.Queue[Optional[list[dict]]] = field(default_factory=lambda: asyncio.Queue(256))
    dropped: bool = False


class HostFeed(Service):
    name = "feed"

    def __init__(self, tick: float = 0.5, sweep: float = 5.0):
        self.tick = tick
        self.sweep = sweep
        self.ctx: Optional[Context] = None
        self.tiles: dict[str, dict] = {}  # mac -> its tile as last sent
        self.watchers: set[Watcher] = set()
        self._dirty: set[Optional[str]] = set()
        self._dirty_lock = threading.Lock()
        self._task: Optional[asyncio.Task[None]] = None
        self._wake = asyncio.Event()
        self.counts = {"ticks": 0, "tiles_computed": 0, "messages": 0, "tiles_sent": 0, "watchers_dropped": 0}

    # -- service -------------------------------------------------------------------------------------
    async def start(self, ctx: Context) -> None:
        self.ctx = ctx
        ctx.store.event_listeners.append(self._on_event)
        ctx.metrics.add_gauges("feed", self.gauges)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bootd-host-feed")

    async def reload(self, ctx: Context) -> None:
        self.ctx = ctx  # hosts and groups are read from ctx.config at every tick

    async def stop(self) -> None:
        if self.ctx is not None and self._on_event in self.ctx.store.event_listeners:
            self.ctx.store.event_listeners.remove(self._on_event)
        await cancel_and_wait(self._task)
        self._task = None
        for w in list(self.watchers):
            self._drop(w)

    def gauges(self) -> dict[str, float]:
        return {"watchers": len(self.watchers), **self.counts}

    def status(self) -> dict[str, object]:
        return dict(self.gauges())

    # -- watchers ------------------------------------------------------------------------------------
    async def watch(self) -> tuple[Watcher, list[dict]]:
        """A new watcher and the full picture to start from (every PC's tile, now)."""
        await self.refresh(None)
        w = Watcher()
        self.watchers.add(w)
        self._wake.set()
        return w, list(self.tiles.values())

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def _drop(self, w: Watcher) -> None:
        self.watchers.discard(w)
        w.dropped = True
        while not w.queue.empty():
            w.queue.get_nowait()
        w.queue.put_nowait(None)  # the stream ends; the browser reconnects

    # -- updates -------------------------------------------------------------------------------------
    def _on_event(self, mac: Optional[str]) -> None:
        if mac is None:
            return
        with self._dirty_lock:
            self._dirty.add(mac)

    async def refresh(self, macs: Optional[set[Optional[str]]]) -> list[dict]:
        """Compute the tiles of `macs` (None: every PC) and return those that changed since last time."""
        assert self.ctx is not None
        ctx = self.ctx
        disks = await disk_connections(ctx)
        now = time.time()
        changed = []
        rows = host_rows(ctx)
        seen = set()
        for row in rows:
            seen.add(row["mac"])
            if macs is not None and row["mac"] not in macs:
                continue
            tile = tile_of(with_state(ctx, row, disks.get(row["mac"]), now))
            self.counts["tiles_computed"] += 1
            if self.tiles.get(row["mac"]) != tile:
                self.tiles[row["mac"]] = tile
                changed.append(tile)
        if macs is None:
            for mac in [m for m in self.tiles if m not in seen]:  # a host removed from the config
                del self.tiles[mac]
        return changed

    def publish(self, changed: list[dict]) -> None:
        if not changed:
            return
        self.counts["messages"] += 1
        self.counts["tiles_sent"] += len(changed) * len(self.watchers)
        for w in list(self.watchers):
            try:
                w.queue.put_nowait(changed)
            except asyncio.QueueFull:
                self.counts["watchers_dropped"] += 1
                log.info("dashboard: a live view fell behind and was dropped (it reconnects)")
                self._drop(w)

    async def _run(self) -> None:
        next_sweep = 0.0
        while True:
            if not self.watchers:
                self._wake.clear()
                await self._wake.wait()
                next_sweep = time.monotonic() + self.sweep
            await asyncio.sleep(self.tick)
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            full = time.monotonic() >= next_sweep
            if not dirty and not full:
                continue
            if full:
                next_sweep = time.monotonic() + self.sweep
            self.counts["ticks"] += 1
            try:
                self.publish(await self.refresh(None if full else dirty))
            except Exception as e:  # the feed must not die with one bad row
                log.warning("dashboard: cannot update the live view: %s", e)
