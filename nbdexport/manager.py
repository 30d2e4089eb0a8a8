"""DiskManager: every host's NBD disk, as a qcow2 overlay over the snapshot it boots.

When a boot starts
------------------
The overlay is made at the host's **menu fetch** (`prepare_boot`, called by the menu handler), not at
its PXE DHCP request, because:
  * one boot makes several DHCP requests: the firmware's PXE ROM, iPXE again after chainloading, and
    the client Linux's own DHCP in its initramfs - by then the disk is connected, and treating that
    request as a new boot would wipe the disk under a running system (as would every lease renewal);
  * the menu fetch happens exactly once per boot, over HTTP (so it is reliably delivered, not a
    retried broadcast), identifies the host by MAC, and happens right before the kernel command line
    carrying the export name is rendered - the snapshot the host boots is known there and nowhere
    earlier (a DHCP request cannot know what the menu will resolve to);
  * a DHCP request from a host that does not boot from us (local disk entry, proxyDHCP mode with
    another server's menu) would cost an overlay for nothing.

Within a boot the overlay is kept: reconnects and short network drops reach the same export name
(the key is the host and its boot number, never a TCP connection). The next `prepare_boot` of the
host is a new boot: new overlay file, new export name; the old one is torn down in the background.

Export names are `secrets.token_urlsafe` tokens, new at every boot, never derived from the MAC. Base
snapshots are block nodes inside qemu-storage-daemon that are never exported. Caveat: qemu's NBD
server answers NBD_OPT_LIST with all export names (qemu 7.2 cannot hide them) and cannot tie an export
to a client address: so by default (`nbd.gatekeeper`) bootd does every NBD handshake itself and a
host lists and opens only its own exports (nbdexport/gatekeeper.py; the daemon then listens on a private
unix socket, and never on TCP while the gatekeeper is on: without the C data paths the gatekeeper relays
in Python). With TLS the gatekeeper terminates TLS itself and keeps the same per-host policy.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from bootd.metrics import Metrics
from bootd.state import StateStore
from nbdexport.access import AccessPolicy
from nbdexport.commits import DiskAdmin
from nbdexport.diskmetrics import DiskReport
from nbdexport.errors import DiskError
from nbdexport.exports import ExportSet
from nbdexport.gatekeeper import Gatekeeper, Splicer
from nbdexport.handoff import Handoff
from nbdexport.model import DiskSettings, Export, SnapshotRef, norm_mac
from nbdexport.overlays import OverlayStore, SpaceReport
from nbdexport.qsd import StorageDaemon, daemon_socket_path
from nbdexport.reaper import Reaper

log = logging.getLogger("bootd.nbd")

__all__ = ["DiskManager", "DiskSettings", "Export", "SnapshotRef", "norm_mac"]


class DiskManager:
    """Per-host overlays and their NBD exports in one qemu-storage-daemon (see module docstring).

    The façade over the engine's parts: `exports` (exports.py: overlays, rows, the daemon's nodes),
    `access` (access.py: the gatekeeper's per-host policy), `reaper` (reaper.py), `admin` (commits.py:
    reset and commit) and `report` (diskmetrics.py: list, status, gauges). Boots start here."""

    def __init__(self, settings: DiskSettings, store: StateStore, qsd: StorageDaemon,
                 resolve_snapshot: Callable[[str], Any],
                 is_persistent: Callable[[str], bool],
                 snapshot_store: Callable[[], Any] = lambda: None,
                 host_name: Callable[[str], Optional[str]] = lambda mac: None,
                 extra_ips: Callable[[str], Iterable[str]] = lambda mac: (),
                 metrics: Optional[Metrics] = None,
                 owner_of: Optional[Callable[[str], Optional[str]]] = None):
        self.store = store
        self.qsd = qsd
        self.resolve_snapshot = resolve_snapshot
        self.is_persistent = is_persistent
        self.snapshot_store = snapshot_store
        self.host_name = host_name
        self.metrics = metrics
        self.exports = ExportSet(settings, store, qsd, host_name, metrics)
        self.access = AccessPolicy(self.exports, extra_ips, owner_of)
        self.reaper = Reaper(self.exports, extra_ips)
        self.admin = DiskAdmin(self.exports, self.reaper, snapshot_store)
        self.report = DiskReport(self.exports, self.reaper)
        if settings.gatekeeper:
            qsd.nbd_unix = "nbd.sock"  # TLS, if any, is the gatekeeper's (qsd.py adds none on the unix socket)
            self.exports.daemon_socket = daemon_socket_path(qsd.run_dir, qsd.nbd_unix)
            if settings.handoff and not settings.tls:  # a TLS session cannot be handed to qemu
                handoff = Handoff(qsd.run_dir, qsd.binary)
                handoff.known = lambda name: name in self.exports.rows
                self.exports.handoff = handoff

    # -- what the parts hold, as the rest of bootd and the tests read it ----------------------------------
    @property
    def s(self) -> DiskSettings:
        return self.exports.s

    @s.setter
    def s(self, settings: DiskSettings) -> None:
        """A reload's knobs (reap_after, ...) apply to every part at once."""
        self.exports.s = settings

    @property
    def overlays(self) -> OverlayStore:
        return self.exports.overlays

    @property
    def aio(self) -> str:
        return self.exports.aio

    @property
    def gatekeeper(self) -> Optional[Gatekeeper]:
        return self.exports.gatekeeper

    @property
    def handoff(self) -> Optional[Handoff]:
        return self.exports.handoff

    @property
    def last_space(self) -> Optional[SpaceReport]:
        return self.exports.last_space

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load state, start/adopt the storage daemon, bring back the exports of running boots."""
        ex = self.exports
        ex.load()
        ex.remove_stale_files()
        if ex.handoff is not None:
            await asyncio.to_thread(ex.handoff.prepare)
            self.qsd.extra_env = ex.handoff.environment()
        await self.qsd.start()
        async with self.qsd.lock:
            await ex.restore()
        if ex.daemon_socket is not None:
            await self._start_gatekeeper(ex.daemon_socket)
        await self.reaper.release_gone_drafts()
        self.reaper.start()

    async def _start_gatekeeper(self, daemon_socket: Callable[[], str]) -> None:
        ex = self.exports

        def on_event(kind: str, detail: dict[str, Any]) -> None:
            ex.inc(kind)
            try:
                self.store.record_event(None, "disk", {"action": kind.replace("_", "-"), **detail})
            except Exception:
                pass

        tls = None
        if self.s.tls and self.qsd.tls is not None:
            from nbdexport.gatekeeper import tls_server_context
            try:
                tls = tls_server_context(self.qsd.tls.kind, self.qsd.tls.dir, self.qsd.tls.verify_peer)
            except (OSError, ValueError, RuntimeError) as e:  # ssl.SSLError is an OSError
                await self.qsd.stop()
                raise DiskError(f"nbd.tls: {e}") from e
        splicer = Splicer(self.qsd.run_dir, on_event=on_event)
        splicer.known = lambda name: name in ex.rows
        gk = Gatekeeper(self.s.listen_all or [self.s.listen], self.s.port, daemon_socket, self.access, splicer,
                        handoff=ex.handoff, daemon_pid=lambda: self.qsd.pid,
                        metrics=self.metrics, timeout=self.s.handshake_timeout,
                        per_address=self.s.handshakes_per_address, tls=tls)
        if tls is None:  # also with the hand-off: it takes what the hand-off cannot (an adopted daemon)
            try:
                await splicer.start()
            except Exception as e:
                # no C data path (no gcc, a noexec run directory): never expose the daemon on TCP (it
                # would list and open every export for anyone); the gatekeeper relays in Python instead
                await splicer.stop()
                gk.splicer_error = f"no NBD splicer: {e}"
                ex.inc("data_path_fallback")
        self.report.gatekeeper_error = None
        path, why = gk.data_path()
        if path == "python-relay" and tls is None:
            self.report.gatekeeper_error = f"NBD data path is the slow Python relay: {why}"
            log.error("%s (access control stays on; fix the C build to get full speed)", self.report.gatekeeper_error)
        try:
            await gk.start()
        except BaseException:
            await gk.stop()
            await splicer.stop()
            await self.qsd.stop()
            raise
        ex.gatekeeper = gk

    async def stop(self) -> None:
        ex = self.exports
        self.reaper.stop()
        for t in list(ex.teardowns):
            t.cancel()
        gk, ex.gatekeeper = ex.gatekeeper, None
        if gk is not None:
            await gk.stop()
        await self.qsd.stop()
        if gk is not None:
            await gk.splicer.stop()
        if ex.handoff is not None:
            ex.handoff.close()

    # -- the gatekeeper's policy: a host opens (and lists) only its own exports (access.py) ---------------
    def exports_for_peer(self, peer_ip: str) -> list[str]:
        return self.access.exports_for_peer(peer_ip)

    def may_open(self, peer_ip: str, name: str) -> bool:
        return self.access.may_open(peer_ip, name)

    # -- the API the menus use ----------------------------------------------------------------------
    async def prepare_boot(self, mac: str, snapshot: Any = None, server_ip: Optional[str] = None) -> Export:
        """A new boot of `mac`: fresh overlay over `snapshot` (None: what the host boots), exported
        under a new token, checked with libnbd. Persistent hosts keep their layer."""
        ex = self.exports
        mac = norm_mac(mac)
        t0 = time.monotonic()
        async with ex.mac_lock(mac):
            snap = self._snapshot(mac, snapshot)
            old = ex.of_mac(mac)
            persistent = bool(self.is_persistent(mac))
            now = time.time()
            for r in old:
                del ex.rows[r.name]
            # the old exports go in the background, except a persistent layer's (same file, file lock)
            # and, on a nearly full disk, the old overlays whose space the new one may need: those go
            # first, before the state store writes (on a full filesystem it can write only after)
            low = ex.space().low
            sync = [r for r in old if r.persistent or low]
            for r in sync:
                await ex.teardown(r, delete_file=not r.persistent)
            if not snap.draft and not (persistent and self._layer_path(mac)):
                ex.check_room()  # a new overlay: refuse before the state store writes anything
            boot = ex.tables.new_boot(mac, now, [r.name for r in old])
            for r in old:
                if r not in sync:
                    ex.spawn_teardown(r)
            if snap.draft:
                # a draft assigned to this host for maintenance: it writes the draft itself
                path, persistent = snap.path, True
            elif persistent:
                path, snap = await self._persistent_layer(mac, snap)
            else:
                path = str(ex.overlays.ephemeral_path(mac, boot, 0))
                await ex.create_overlay(snap.path, path)
            row = await ex.add(mac, boot, True, snap, path, persistent, server_ip, now)
        ex.inc("boots")
        if snap.draft:
            self.reaper.wake()  # its release after a shutdown needs the reaper's short interval
        self.store.record_event(mac, "disk", {"action": "boot", "snapshot": snap.name, "persistent": persistent,
                                              "ms": round((time.monotonic() - t0) * 1000, 1)})
        return row.export(self.s.port, self.s.tls)

    async def prepare_export(self, mac: str, snapshot: Any, server_ip: Optional[str] = None) -> Export:
        """One more export in the host's current boot (menus offering several snapshots); idempotent."""
        ex = self.exports
        mac = norm_mac(mac)
        async with ex.mac_lock(mac):
            snap = self._snapshot(mac, snapshot)
            mine = ex.of_mac(mac)
            for r in mine:
                if r.snap.key == snap.key:
                    return r.export(self.s.port, self.s.tls)
            if not mine:
                raise DiskError(f"{mac} has no boot in progress (prepare_boot first)", status=409)
            boot = mine[0].boot
            n = 1 + max(int(Path(r.overlay).name.split(".")[2]) if not r.persistent else 0 for r in mine)
            path = str(ex.overlays.ephemeral_path(mac, boot, n))
            await ex.create_overlay(snap.path, path)
            row = await ex.add(mac, boot, False, snap, path, False, server_ip, time.time())
        return row.export(self.s.port, self.s.tls)

    def export_for(self, mac: str, snapshot: Any = None) -> Optional[Export]:
        """The current boot's export (of that snapshot; None = the boot's main one), without I/O."""
        try:
            mac = norm_mac(mac)
        except DiskError:
            return None
        key = SnapshotRef.key_of(snapshot) if snapshot is not None else None
        for r in self.exports.rows.values():
            if r.mac == mac and (r.snap.key == key if key is not None else r.main):
                return r.export(self.s.port, self.s.tls)
        return None

    def snapshots_in_use(self) -> dict[str, list[str]]:
        """{snapshot key: [who]} for every base under a running export or a persistent layer."""
        out: dict[str, list[str]] = {}
        for r in self.exports.rows.values():
            out.setdefault(r.snap.key, []).append(f"export of {r.mac} (boot {r.boot})")
        for layer in self.exports.tables.layers():
            out.setdefault(layer["snapshot_key"], []).append(f"persistent layer of {layer['mac']}")
        return out

    def open_check(self, snapshot: Any) -> list[str]:
        """For the snapshot store's register_open_check: who has this snapshot open."""
        return self.snapshots_in_use().get(str(getattr(snapshot, "id", snapshot)), [])

    def _snapshot(self, mac: str, snapshot: Any) -> SnapshotRef:
        if snapshot is None:
            snapshot = self.resolve_snapshot(mac)
            if snapshot is None:
                raise DiskError(f"no snapshot to boot for {mac}", status=404)
        return SnapshotRef.of(snapshot, self.snapshot_store())

    def _layer_path(self, mac: str) -> Optional[str]:
        """The host's persistent layer file, if it has one on disk."""
        layer = self.exports.tables.layer(mac)
        return str(layer["path"]) if layer is not None and Path(layer["path"]).exists() else None

    async def _persistent_layer(self, mac: str, snap: SnapshotRef) -> tuple[str, SnapshotRef]:
        """The host's layer, made on its first boot; it stays on the snapshot it was made over (a
        newer snapshot for its group does not reach it until `bootctl disk reset`)."""
        ex = self.exports
        layer = ex.tables.layer(mac)
        if layer is not None and Path(layer["path"]).exists():
            return layer["path"], SnapshotRef(layer["snapshot_key"], layer["snapshot_name"], layer["base_path"],
                                              layer["snapshot_id"])
        path = str(ex.overlays.persistent_path(mac))
        await ex.create_overlay(snap.path, path)
        ex.tables.put_layer(mac, path, snap.key, snap.id, snap.name, snap.path, time.time())
        return path, snap

    # -- admin operations (commits.py), reaping (reaper.py), reports (diskmetrics.py) -------------------
    async def reset(self, mac: str, dry_run: bool = False) -> dict[str, Any]:
        return await self.admin.reset(mac, dry_run)

    async def commit(self, mac: str, note: str = "", force: bool = False) -> dict[str, Any]:
        return await self.admin.commit(mac, note, force)

    async def reap_once(self, now: Optional[float] = None) -> list[str]:
        return await self.reaper.reap_once(now)

    async def end_maintenance(self, mac: str, snapshot_id: Optional[int] = None) -> list[str]:
        """The host's maintenance ended: its export of the draft (of `snapshot_id`, or any) goes now, so the
        draft can be sealed at once. Returns the names of the drafts released."""
        rows = await self.reaper.release_drafts(
            norm_mac(mac), lambda r: snapshot_id is None or r.snap.id == snapshot_id)
        return [r.snap.name for r in rows]

    def space(self) -> SpaceReport:
        return self.exports.space()

    async def list(self) -> list[dict[str, Any]]:
        return await self.report.list()

    def status(self) -> dict[str, Any]:
        return self.report.status()

    def data_path(self) -> tuple[str, Optional[str]]:
        return self.report.data_path()

    def warning(self) -> Optional[str]:
        return self.report.warning()

    def export_io(self, name: str) -> Optional[dict[str, int]]:
        return self.report.export_io(name)

    def gauges(self) -> dict[str, float]:
        return self.report.gauges()
