"""ExportSet: the running boots' exports - their overlay files, their rows (in memory and in the state
store) and their block nodes and NBD exports in the storage daemon, over shared base nodes.

Each snapshot an overlay sits on is one read-only qcow2 node in the daemon ("b" + a hash of its path),
shared by every overlay over it and never exported itself. It is added by the first export over it and
removed when the last one is torn down; both under the base's lock, and the cache of base nodes
(`_bases`) only ever names a node that no removal is under way for (see `_release_base`).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from bootd.metrics import Metrics
from bootd.state import StateStore
from nbdexport.check import check_export
from nbdexport.errors import DiskError, NoSpace, StorageDaemonDown
from nbdexport.gatekeeper import Gatekeeper
from nbdexport.handoff import Handoff
from nbdexport.model import DiskSettings, ExportRow, SnapshotRef
from nbdexport.overlays import OverlayStore, SpaceReport
from nbdexport.qsd import StorageDaemon
from nbdexport.store import DiskTables

log = logging.getLogger("bootd.nbd")


def base_node_name(path: str) -> str:
    """The daemon's node name of the shared base over snapshot file `path` (the same across restarts)."""
    return "b" + hashlib.sha1(path.encode()).hexdigest()[:16]


class ExportSet:
    """The exports of running boots and everything that makes them (see the module docstring)."""

    def __init__(self, settings: DiskSettings, store: StateStore, qsd: StorageDaemon,
                 host_name: Callable[[str], Optional[str]], metrics: Optional[Metrics] = None):
        self.s = settings
        self.store = store
        self.tables = DiskTables(store)  # this engine's rows: its only SQL
        self.qsd = qsd
        self.overlays = OverlayStore(settings.directory, subclusters=settings.subclusters)
        self.host_name = host_name
        self.metrics = metrics
        self.aio = settings.aio
        self.aio_error: Optional[str] = None
        self._aio_probed = False
        self.rows: dict[str, ExportRow] = {}  # export name -> row
        self._bases: dict[str, str] = {}  # base path -> node name (present in qsd, no removal under way)
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._mac_locks: dict[str, asyncio.Lock] = {}
        self.teardowns: set[asyncio.Task[None]] = set()
        self._space_low = False
        self.last_space: Optional[SpaceReport] = None
        # the data path in front of the daemon (set by the DiskManager): told when an export is no more
        self.gatekeeper: Optional[Gatekeeper] = None
        self.handoff: Optional[Handoff] = None
        self.daemon_socket: Optional[Callable[[], str]] = None  # the daemon's private NBD socket, if any
        qsd.on_restart = self.restore
        qsd.on_write_threshold = self.overlay_full

    def inc(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("nbd", name, 1, **labels)

    def mac_lock(self, mac: str) -> asyncio.Lock:
        """Held by whatever changes one host's exports (boots, resets, commits, the reaper)."""
        return self._mac_locks.setdefault(mac, asyncio.Lock())

    def of_mac(self, mac: str) -> list[ExportRow]:
        return [r for r in self.rows.values() if r.mac == mac]

    # -- state ------------------------------------------------------------------------------------
    def load(self) -> None:
        self.rows.clear()
        for stored in self.tables.exports():
            snap = SnapshotRef(stored["snapshot_key"], stored["snapshot_name"], stored["base_path"],
                               stored["snapshot_id"])
            self.rows[stored["name"]] = ExportRow(
                stored["name"], stored["mac"], stored["boot"], bool(stored["main"]), snap, stored["overlay"],
                stored["node"], bool(stored["persistent"]), stored["size"], stored["server_ip"],
                stored["created"], stored["last_active"])

    def remove_stale_files(self) -> None:
        """Overlays on disk that no running boot uses (left by a crash or a reap that died) go."""
        keep = {r.overlay for r in self.rows.values()}
        for p in self.overlays.ephemeral_files():
            if str(p) not in keep:
                log.info("removing stale overlay %s", p)
                self.overlays.remove(p)
        layers = {layer["path"] for layer in self.tables.layers()}
        for p in self.overlays.persistent_files():
            if str(p) not in layers:
                log.info("removing stale persistent layer %s", p)
                self.overlays.remove(p)
        self.overlays.prune_templates(set())  # rebuilt on demand; bases may have changed

    def _insert(self, row: ExportRow) -> None:
        self.tables.add_export(row.name, row.mac, row.boot, row.main, row.snap.key, row.snap.id, row.snap.name,
                               row.snap.path, row.overlay, row.node, row.persistent, row.size, row.server_ip,
                               row.created, row.last_active)

    # -- the disk directory ---------------------------------------------------------------------------
    def space(self) -> SpaceReport:
        rep = self.overlays.space(self.s.warn_free_percent, self.s.warn_free_bytes)
        self.last_space = rep
        if rep.low and not self._space_low:
            log.warning("disk directory %s is nearly full: %d MiB free (warning below %d MiB)",
                        rep.path, rep.free >> 20, rep.warn_below >> 20)
            self.inc("space_low_warnings")
        elif not rep.low and self._space_low:
            log.info("disk directory %s has room again: %d MiB free", rep.path, rep.free >> 20)
        self._space_low = rep.low
        return rep

    def check_room(self) -> None:
        rep = self.space()
        if rep.free < (1 << 20):
            raise NoSpace(f"disk directory {rep.path} is full ({rep.free} bytes free)")

    async def create_overlay(self, base: str, path: str) -> None:
        self.check_room()
        if not os.path.exists(base):
            raise DiskError(f"snapshot file missing: {base}", status=404)
        if not self.overlays.has_template(base):
            async with self._base_locks.setdefault("template:" + base, asyncio.Lock()):
                await asyncio.to_thread(self.overlays.template_for, base)  # qemu-img, once per base
        self.overlays.create(base, Path(path))  # a file copy: cheaper than a thread hop

    # -- the storage daemon ---------------------------------------------------------------------------
    async def choose_aio(self) -> None:
        """io_uring unless this kernel or qemu refuses it (io_uring_disabled, a seccomp profile, a qemu
        built without liburing): then qemu's thread pool, said once. Probed on a throw-away node so that
        no export ever fails for it; the first start decides for the daemon's lifetime (restarts reuse it)."""
        if self.aio != "io_uring" or self._aio_probed:
            return
        self._aio_probed = True
        probe = Path(self.qsd.run_dir) / "aio-probe"
        node = "aioprobe" + secrets.token_hex(4)  # unique: an adopted daemon may hold a crashed start's probe
        try:
            probe.write_bytes(b"\0" * 4096)
            await self.qsd.execute("blockdev-add", {"driver": "file", "node-name": node, "read-only": True,
                                                    "filename": str(probe), "aio": "io_uring"})
            await self.qsd.execute("blockdev-del", {"node-name": node})
        except StorageDaemonDown:
            self._aio_probed = False  # the daemon died, not io_uring: ask again once it is back
        except (DiskError, OSError) as e:
            self.aio, self.aio_error = "threads", f"io_uring refused ({e}); using threads"
            log.warning("storage daemon: %s", self.aio_error)
            self.inc("aio_fallback")
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def _file(self, path: str, node: str) -> dict[str, Any]:
        return {"driver": "file", "filename": path, "node-name": node, "aio": self.aio}

    async def add(self, mac: str, boot: int, main: bool, snap: SnapshotRef, overlay: str, persistent: bool,
                  server_ip: Optional[str], now: float) -> ExportRow:
        """Export `overlay` under a new token (stored first), checked with libnbd when asked to."""
        name = secrets.token_urlsafe(18)
        node = "ov" + secrets.token_hex(8)
        addrs = self.s.listen_all or [self.s.listen]
        row = ExportRow(name, mac, boot, main, snap, overlay, node, persistent, 0,
                        server_ip if server_ip is not None and server_ip in addrs else self.s.listen, now, now)
        self._insert(row)  # intent first: a restore after a crash re-adds it
        self.rows[name] = row
        try:
            await self._export(row)
        except StorageDaemonDown:
            # the restart's restore adds every row, this one included; wait for it
            try:
                await asyncio.wait_for(self.qsd.up.wait(), 15)
                async with self.qsd.lock:
                    exps = await self.qsd.execute("query-block-exports")
                    if not any(e["id"] == row.node for e in exps):
                        await self._export(row)
            except asyncio.TimeoutError:
                self.forget(row)
                raise StorageDaemonDown("the storage daemon did not come back within 15 s") from None
            except Exception:
                self.forget(row)
                raise
        except Exception:
            self.forget(row)
            raise
        if self.s.check_exports:
            try:
                size = await asyncio.to_thread(check_export, "127.0.0.1" if self.s.listen in ("0.0.0.0", "::")
                                               else self.s.listen, self.s.port, name, None,
                                               # the daemon's private socket has no TLS (the gatekeeper's is)
                                               None if self.daemon_socket else self.s.client_tls,
                                               unix=self.daemon_socket() if self.daemon_socket else None)
            except DiskError:
                self.inc("check_failed")
                self.forget(row)
                self.spawn_teardown(row)
                raise
            row.size = size
            self.tables.set_export_size(name, size)
        self.inc("exports_added")
        return row

    def forget(self, row: ExportRow, stored: bool = True) -> None:
        """The export is no more: in memory (nobody opens it), and in the state store unless `stored`
        is False (the caller deletes the row itself, after freeing the file)."""
        self.rows.pop(row.name, None)
        if self.gatekeeper is not None:
            self.gatekeeper.forget(row.name)
        if self.handoff is not None:
            self.handoff.forget(row.name)
        if stored:
            self.tables.drop_exports([row.name])

    def _base_in_use(self, path: str) -> bool:
        return any(r.snap.path == path and r.has_overlay for r in self.rows.values())

    async def _base_node(self, path: str) -> str:
        """The shared base node over snapshot file `path`, added if the daemon has none. The caller's row
        is in `rows` already, so no removal of the node can start from here on (`_release_base`)."""
        node = self._bases.get(path)
        if node:
            return node
        async with self._base_locks.setdefault(path, asyncio.Lock()):
            node = self._bases.get(path)
            if node:
                return node
            node = base_node_name(path)
            await self.qsd.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, "read-only": True, "file": self._file(path, "f" + node)})
            self._bases[path] = node
            return node

    async def _release_base(self, path: str) -> None:
        """Remove the base node over `path` when no export uses it any more.

        The node leaves the cache before it is removed in the daemon (and comes back when the daemon
        refuses: still in use): an export added meanwhile finds no node in the cache, waits for this
        lock and adds the node again, instead of naming one the daemon is deleting."""
        if self._base_in_use(path):
            return
        async with self._base_locks.setdefault(path, asyncio.Lock()):
            node = self._bases.get(path)
            if node is None or self._base_in_use(path):
                return
            del self._bases[path]
            try:
                await self.qsd.execute("blockdev-del", {"node-name": node})
            except StorageDaemonDown:
                raise  # the daemon is gone, and its nodes: its restore rebuilds the cache
            except DiskError as e:
                if "Cannot find" in str(e) or "not found" in str(e).lower():
                    return
                self._bases[path] = node  # still there
                if "in use" not in str(e):
                    log.warning("cannot remove base node for %s: %s", path, e)

    def _capped(self, row: ExportRow) -> dict[str, Any]:
        """The overlay's file as its qcow2 node sees it: with nbd.overlay_max, behind a `raw` node of
        that size, so qemu itself answers ENOSPC to a write the overlay file has no room for (the host's
        writes fail; its reads, other hosts and the filesystem are untouched).

        Why this and not qemu 7.2's write threshold: `block-set-write-threshold` only sends a
        BLOCK_WRITE_THRESHOLD event after the write went through, and what bootd could do then costs
        more than that host's writes: `blockdev-reopen` to read-only is refused while a writable export
        holds the node, and deleting the export cuts the PC off, reads included. A raw node with
        `size` refuses writes past its end synchronously (raw_adjust_offset: -ENOSPC), and qcow2 only
        ever appends clusters to an overlay, so the highest file offset bounds what the overlay
        uses. The raw node must not be longer than its file: the file is made sparse up to the limit
        (no blocks used). A layer already larger than the limit keeps its size (and cannot grow)."""
        spec = self._file(row.overlay, "f" + row.node)
        if not self.s.overlay_max or not row.has_overlay:  # no limit, or a draft (no overlay)
            return spec
        step = 64 << 10
        length = os.stat(row.overlay).st_size
        size = max(self.s.overlay_max // step * step, -(-length // step) * step)
        if length < size:
            os.truncate(row.overlay, size)
        return {"driver": "raw", "node-name": "c" + row.node, "offset": 0, "size": size, "file": spec}

    def overlay_full(self, node: str) -> None:
        """qemu's BLOCK_WRITE_THRESHOLD on an overlay's size-limited node: a write went past
        nbd.overlay_max and was refused (ENOSPC to that host). Said once per export."""
        row = next((r for r in self.rows.values() if "c" + r.node == node), None)
        if row is None or row.full:
            return
        row.full = True
        limit = self.overlay_limit(row) or 0
        log.warning("the disk of %s reached nbd.overlay_max (%d MiB): its writes fail with ENOSPC until its "
                    "next boot or `bootctl disk reset`", self.host_name(row.mac) or row.mac, limit >> 20)
        self.inc("overlay_full")
        try:
            self.store.record_event(row.mac, "disk", {"action": "overlay-full", "limit": limit})
        except Exception as e:  # e.g. a full state store: the log line above is enough
            log.debug("recording overlay-full of %s: %s", row.mac, e)

    def overlay_limit(self, row: ExportRow) -> Optional[int]:
        """The bytes this export's overlay may grow to (None: no limit)."""
        if not self.s.overlay_max or not row.has_overlay:
            return None
        try:
            return max(self.s.overlay_max, os.stat(row.overlay).st_size)
        except OSError:
            return self.s.overlay_max

    async def _export(self, row: ExportRow) -> None:
        capped = self._capped(row)
        spec: dict[str, Any] = {"driver": "qcow2", "node-name": row.node, "file": capped}
        if row.has_overlay:  # an overlay: its backing is the shared, never exported base node
            spec["backing"] = await self._base_node(row.snap.path)
        # all commands in flight at once (QMP runs them in order): one round trip to the daemon
        commands = [
            self.qsd.execute("blockdev-add", spec),
            self.qsd.execute("block-export-add", {
                "type": "nbd", "id": row.node, "node-name": row.node, "name": row.name, "writable": True})]
        if capped["driver"] == "raw":  # tell bootd when a write hits the limit (see _capped, overlay_full)
            commands.append(self.qsd.execute("block-set-write-threshold", {
                "node-name": capped["node-name"], "write-threshold": capped["size"]}))
        added, exported, *threshold = await asyncio.gather(*commands, return_exceptions=True)
        if isinstance(added, BaseException):
            raise added
        if isinstance(exported, BaseException):
            try:
                await self.qsd.execute("blockdev-del", {"node-name": row.node})
            except DiskError:
                pass
            raise exported
        if threshold and isinstance(threshold[0], BaseException):
            log.warning("no write threshold on the overlay of %s (overlay_full is not reported): %s",
                        row.mac, threshold[0])

    def spawn_teardown(self, row: ExportRow) -> None:
        t = asyncio.get_running_loop().create_task(self.teardown(row, delete_file=not row.persistent))
        self.teardowns.add(t)
        t.add_done_callback(self.teardowns.discard)

    async def teardown(self, row: ExportRow, delete_file: bool) -> None:
        """Drop the export (hard: clients are cut off), its node, and the overlay file if asked."""
        try:
            try:
                await self.qsd.execute("block-export-del", {"id": row.node, "mode": "hard"})
            except DiskError as e:
                if "not found" not in str(e).lower():
                    raise
            for _ in range(500):
                exps = await self.qsd.execute("query-block-exports")
                if not any(e["id"] == row.node for e in exps):
                    break
                await asyncio.sleep(0.01)
            try:
                await self.qsd.execute("blockdev-del", {"node-name": row.node})
            except DiskError as e:
                if "not found" not in str(e).lower() and "Cannot find" not in str(e):
                    raise
            await self._release_base(row.snap.path)
        except StorageDaemonDown:
            pass  # the daemon is gone: so are its nodes
        except DiskError as e:
            log.warning("tearing down export of %s: %s", row.mac, e)
        if delete_file:
            self.overlays.remove(row.overlay)

    async def restore(self) -> None:
        """Make the daemon's exports equal to the running boots in the state store (after a start, an
        adoption or a restart of the daemon). Caller holds qsd.lock."""
        await self.choose_aio()
        exps = {e["id"]: e for e in await self.qsd.execute("query-block-exports")}
        nodes = {n["node-name"] for n in await self.qsd.execute("query-named-block-nodes", {"flat": True})}
        self._bases = {}
        wanted = {r.node for r in self.rows.values()}
        for eid in list(exps):
            if eid not in wanted:
                await self.qsd.execute("block-export-del", {"id": eid, "mode": "hard"})
        for r in list(self.rows.values()):
            base = base_node_name(r.snap.path)
            if base in nodes and r.has_overlay:
                self._bases[r.snap.path] = base
            if r.node in exps:
                continue
            if not os.path.exists(r.overlay) or not os.path.exists(r.snap.path):
                log.warning("export of %s lost its file (%s); dropping it", r.mac, r.overlay)
                self.forget(r)
                continue
            try:
                if r.node in nodes:
                    await self.qsd.execute("block-export-add", {"type": "nbd", "id": r.node, "node-name": r.node,
                                                                "name": r.name, "writable": True})
                else:
                    await self._export(r)
                self.inc("exports_restored")
            except DiskError as e:
                log.error("cannot restore export of %s: %s", r.mac, e)
        # nodes nobody wants any more (adopted daemon): overlays first, then bases
        for _ in range(100):
            exps_now = await self.qsd.execute("query-block-exports")
            if not any(e["id"] not in wanted for e in exps_now):
                break
            await asyncio.sleep(0.01)
        keep = wanted | set(self._bases.values())
        for n in sorted(nodes, key=lambda n: n.startswith("b")):
            if n.startswith(("ov", "b", "aioprobe")) and n not in keep:
                try:
                    await self.qsd.execute("blockdev-del", {"node-name": n})
                except DiskError:
                    pass
        if self.rows:
            log.info("storage daemon serves %d export(s) of running boots", len(self.rows))
