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
import hashlib
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from bootd.macaddr import normalize_mac
from nbdexport.check import ClientTls, check_export
from nbdexport.connections import peers
from nbdexport.errors import DiskError, NoSpace, StorageDaemonDown
from nbdexport.gatekeeper import Gatekeeper, Splicer
from nbdexport.handoff import Handoff
from nbdexport.overlays import OverlayStore, SpaceReport, allocated_bytes
from nbdexport.qsd import StorageDaemon, daemon_socket_path
from nbdexport.store import DiskTables

log = logging.getLogger("bootd.nbd")


def norm_mac(mac: str) -> str:
    """bootd.macaddr.normalize_mac, as a DiskError (HTTP 400) when it is not a MAC."""
    try:
        return normalize_mac(mac)
    except ValueError:
        raise DiskError(f"not a MAC address: {mac!r}", status=400) from None


@dataclass(frozen=True)
class SnapshotRef:
    """What an overlay sits on: a snapshot of the store (id set) or a bare qcow2 file (tests, tools)."""

    key: str
    name: str
    path: str
    id: Optional[int] = None
    draft: bool = False  # a writable draft of the snapshot store: exported as is, no overlay

    @classmethod
    def of(cls, obj: Any, store: Any = None) -> "SnapshotRef":
        if isinstance(obj, SnapshotRef):
            return obj
        if isinstance(obj, (str, os.PathLike)) and not str(obj).isdigit():
            path = os.path.realpath(os.fspath(obj))
            if not os.path.isfile(path):
                raise DiskError(f"no such snapshot file: {path}", status=404)
            return cls(key=f"file:{path}", name=os.path.basename(path), path=path)
        if isinstance(obj, (int, str)):
            if store is None:
                raise DiskError("no snapshot store to resolve a snapshot id", status=404)
            obj = store.get(int(obj))
        sid = int(obj.id)
        path = store.snapshot_path(sid) if store is not None and hasattr(store, "snapshot_path") else obj.path
        return cls(key=str(sid), name=str(getattr(obj, "name", sid)), path=str(path), id=sid,
                   draft=getattr(obj, "state", "sealed") == "draft")


@dataclass(frozen=True)
class Export:
    """What the menu renders into a host's kernel command line (the NBD export of its disk)."""

    mac: str
    name: str
    host: str
    port: int
    snapshot_id: Optional[int]
    snapshot_name: str
    size: int
    persistent: bool
    tls: bool
    boot: int
    format: str = "raw"

    @property
    def export(self) -> str:
        return self.name

    @property
    def uri(self) -> str:
        return f"{'nbds' if self.tls else 'nbd'}://{self.host}:{self.port}/{self.name}"

    @property
    def cmdline(self) -> str:
        return f"bootd.nbd={self.host}:{self.port}/{self.name}"

    def as_dict(self) -> dict:
        return {"mac": self.mac, "name": self.name, "export": self.name, "host": self.host, "port": self.port,
                "uri": self.uri, "cmdline": self.cmdline, "format": self.format, "snapshot_id": self.snapshot_id,
                "snapshot": self.snapshot_name, "size": self.size, "persistent": self.persistent,
                "tls": self.tls, "boot": self.boot}


@dataclass
class _Row:
    """One export as stored in `disk_exports` (and kept in memory)."""

    name: str
    mac: str
    boot: int
    main: bool
    snap: SnapshotRef
    overlay: str
    node: str
    persistent: bool
    size: int
    server_ip: str
    created: float
    last_active: float = 0.0
    full: bool = False  # a write past nbd.overlay_max was refused (memory only: until the next boot)

    def export(self, port: int, tls: bool) -> Export:
        return Export(self.mac, self.name, self.server_ip, port, self.snap.id, self.snap.name, self.size,
                      self.persistent, tls, self.boot)


@dataclass
class DiskSettings:
    directory: str
    run_dir: str
    listen: str  # the first NBD address: bootd's own export check connects here
    port: int = 10809
    reap_after: float = 4 * 3600
    reap_interval: float = 60
    warn_free_percent: float = 10
    warn_free_bytes: int = 1 << 30
    check_exports: bool = True
    listen_all: list = field(default_factory=list)  # every NBD address (the served ones)
    tls: bool = False
    client_tls: Optional[ClientTls] = None
    gatekeeper: bool = False  # NBD handshakes through bootd's gatekeeper (with TLS too); see gatekeeper.py
    handshake_timeout: float = 10.0  # gatekeeper: seconds a client has for its whole NBD handshake
    handshakes_per_address: int = 8  # gatekeeper: handshakes in progress at once from one address
    aio: str = "io_uring"  # how the storage daemon reads and writes files: io_uring, or threads (qemu's default)
    handoff: bool = True  # gatekept connections continue inside the daemon (handoff.py), not through the splicer
    subclusters: bool = True  # new overlays with qcow2 extended L2 entries (see overlays.py)
    overlay_max: int = 0  # bytes one overlay or persistent layer may use on disk; 0: no limit (see _capped)


class DiskManager:
    """Per-host overlays and their NBD exports in one qemu-storage-daemon (see module docstring)."""

    def __init__(self, settings: DiskSettings, store: Any, qsd: StorageDaemon,
                 resolve_snapshot: Callable[[str], Any],
                 is_persistent: Callable[[str], bool],
                 snapshot_store: Callable[[], Any] = lambda: None,
                 host_name: Callable[[str], Optional[str]] = lambda mac: None,
                 extra_ips: Callable[[str], Any] = lambda mac: (),
                 metrics: Any = None,
                 owner_of: Optional[Callable[[str], Optional[str]]] = None):
        self.s = settings
        self.store = store
        self.tables = DiskTables(store)  # this engine's rows: its only SQL
        self.qsd = qsd
        self.overlays = OverlayStore(settings.directory, subclusters=settings.subclusters)
        self.aio = settings.aio
        self.aio_error: Optional[str] = None
        self._aio_probed = False
        self.resolve_snapshot = resolve_snapshot
        self.is_persistent = is_persistent
        self.snapshot_store = snapshot_store
        self.host_name = host_name
        self.extra_ips = extra_ips
        self.metrics = metrics
        self._rows: dict[str, _Row] = {}            # export name -> row
        self._bases: dict[str, str] = {}            # base path -> node name (present in qsd)
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._mac_locks: dict[str, asyncio.Lock] = {}
        self._teardowns: set[asyncio.Task] = set()
        self._reaper: Optional[asyncio.Task] = None
        self._space_low = False
        self.last_space: Optional[SpaceReport] = None
        qsd.on_restart = self._restore
        qsd.on_write_threshold = self._overlay_full
        self.owner_of = owner_of or self._configured_owner  # who is at an address (the daemon: peers.mac_at)
        self.gatekeeper: Optional[Gatekeeper] = None
        self.gatekeeper_error: Optional[str] = None
        self._daemon_socket = None
        self.handoff: Optional[Handoff] = None
        if settings.gatekeeper:
            qsd.nbd_unix = "nbd.sock"  # TLS, if any, is the gatekeeper's (qsd.py adds none on the unix socket)
            self._daemon_socket = daemon_socket_path(qsd.run_dir, qsd.nbd_unix)
            if settings.handoff and not settings.tls:  # a TLS session cannot be handed to qemu
                self.handoff = Handoff(qsd.run_dir, qsd.binary)
                self.handoff.known = lambda name: name in self._rows

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load state, start/adopt the storage daemon, bring back the exports of running boots."""
        self._load()
        self._remove_stale_files()
        if self.handoff is not None:
            await asyncio.to_thread(self.handoff.prepare)
            self.qsd.extra_env = self.handoff.environment()
        await self.qsd.start()
        async with self.qsd.lock:
            await self._restore()
        if self._daemon_socket is not None:
            await self._start_gatekeeper()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _choose_aio(self) -> None:
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
            self._inc("aio_fallback")
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def _file(self, path: str, node: str) -> dict:
        return {"driver": "file", "filename": path, "node-name": node, "aio": self.aio}

    async def _start_gatekeeper(self) -> None:
        def on_event(kind: str, detail: dict) -> None:
            self._inc(kind)
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
        splicer.known = lambda name: name in self._rows
        gk = Gatekeeper(self.s.listen_all or [self.s.listen], self.s.port, self._daemon_socket, self, splicer,
                        handoff=self.handoff, daemon_pid=lambda: self.qsd.pid,
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
                self._inc("data_path_fallback")
        self.gatekeeper_error = None
        path, why = gk.data_path()
        if path == "python-relay" and tls is None:
            self.gatekeeper_error = f"NBD data path is the slow Python relay: {why}"
            log.error("%s (access control stays on; fix the C build to get full speed)", self.gatekeeper_error)
        try:
            await gk.start()
        except BaseException:
            await gk.stop()
            await splicer.stop()
            await self.qsd.stop()
            raise
        self.gatekeeper = gk

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for t in list(self._teardowns):
            t.cancel()
        gk, self.gatekeeper = self.gatekeeper, None
        if gk is not None:
            await gk.stop()
        await self.qsd.stop()
        if gk is not None:
            await gk.splicer.stop()
        if self.handoff is not None:
            self.handoff.close()

    # -- the gatekeeper's policy: a host opens (and lists) only its own exports ------------------
    def _peer_mac(self, peer_ip: str) -> Optional[str]:
        """The MAC at the peer's address by a live binding (bootd/peers.py: configured ip, live lease,
        fresh neighbour entry; None when unknown or when they disagree). Never an old address."""
        try:
            mac = self.owner_of(peer_ip)
        except Exception as e:  # no answer is no identity: refused
            log.debug("owner_of(%s): %s", peer_ip, e)
            return None
        return mac.lower() if mac else None

    def _configured_owner(self, peer_ip: str) -> Optional[str]:
        """Without a daemon's owner_of (a bare DiskManager): the host configured at that address."""
        macs = {r.mac for r in self._rows.values() if peer_ip in set(self.extra_ips(r.mac) or ())}
        return macs.pop() if len(macs) == 1 else None

    def exports_for_peer(self, peer_ip: str) -> list[str]:
        mac = self._peer_mac(peer_ip)
        return [r.name for r in self._rows.values() if mac is not None and r.mac == mac]

    def may_open(self, peer_ip: str, name: str) -> bool:
        row = self._rows.get(name)
        return row is not None and self._peer_mac(peer_ip) == row.mac

    def _inc(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("nbd", name, **labels)

    # -- state ------------------------------------------------------------------------------------
    def _load(self) -> None:
        self._rows.clear()
        for r in self.tables.exports():
            snap = SnapshotRef(r["snapshot_key"], r["snapshot_name"], r["base_path"], r["snapshot_id"])
            self._rows[r["name"]] = _Row(r["name"], r["mac"], r["boot"], bool(r["main"]), snap, r["overlay"],
                                         r["node"], bool(r["persistent"]), r["size"], r["server_ip"],
                                         r["created"], r["last_active"])

    def _remove_stale_files(self) -> None:
        """Overlays on disk that no running boot uses (left by a crash or a reap that died) go."""
        keep = {r.overlay for r in self._rows.values()}
        for p in self.overlays.ephemeral_files():
            if str(p) not in keep:
                log.info("removing stale overlay %s", p)
                self.overlays.remove(p)
        layers = {r["path"] for r in self.tables.layers()}
        for p in self.overlays.persistent_files():
            if str(p) not in layers:
                log.info("removing stale persistent layer %s", p)
                self.overlays.remove(p)
        self.overlays.prune_templates(set())  # rebuilt on demand; bases may have changed

    def _insert(self, row: _Row) -> None:
        self.tables.add_export(row.name, row.mac, row.boot, row.main, row.snap.key, row.snap.id, row.snap.name,
                               row.snap.path, row.overlay, row.node, row.persistent, row.size, row.server_ip,
                               row.created, row.last_active)

    # -- the API the menus use ----------------------------------------------------------------------
    async def prepare_boot(self, mac: str, snapshot: Any = None, server_ip: Optional[str] = None) -> Export:
        """A new boot of `mac`: fresh overlay over `snapshot` (None: what the host boots), exported
        under a new token, checked with libnbd. Persistent hosts keep their layer."""
        mac = norm_mac(mac)
        t0 = time.monotonic()
        async with self._mac_lock(mac):
            snap = self._snapshot(mac, snapshot)
            old = [r for r in self._rows.values() if r.mac == mac]
            persistent = bool(self.is_persistent(mac))
            now = time.time()
            for r in old:
                del self._rows[r.name]
            # the old exports go in the background, except a persistent layer's (same file, file lock)
            # and, on a nearly full disk, the old overlays whose space the new one may need: those go
            # first, before the state store writes (on a full filesystem it can write only after)
            low = self.space().low
            sync = [r for r in old if r.persistent or low]
            for r in sync:
                await self._teardown(r, delete_file=not r.persistent)
            if not snap.draft and not (persistent and self._layer_path(mac)):
                self._check_room()  # a new overlay: refuse before the state store writes anything
            boot = self.tables.new_boot(mac, now, [r.name for r in old])
            for r in old:
                if r not in sync:
                    self._spawn_teardown(r)
            if snap.draft:
                # a draft assigned to this host for maintenance: it writes the draft itself
                path, persistent = snap.path, True
            elif persistent:
                path, snap = await self._persistent_layer(mac, snap)
            else:
                path = str(self.overlays.ephemeral_path(mac, boot, 0))
                await self._create_overlay(snap.path, path)
            row = await self._add(mac, boot, True, snap, path, persistent, server_ip, now)
        self._inc("boots")
        self.store.record_event(mac, "disk", {"action": "boot", "snapshot": snap.name, "persistent": persistent,
                                              "ms": round((time.monotonic() - t0) * 1000, 1)})
        return row.export(self.s.port, self.s.tls)

    async def prepare_export(self, mac: str, snapshot: Any, server_ip: Optional[str] = None) -> Export:
        """One more export in the host's current boot (menus offering several snapshots); idempotent."""
        mac = norm_mac(mac)
        async with self._mac_lock(mac):
            snap = self._snapshot(mac, snapshot)
            mine = [r for r in self._rows.values() if r.mac == mac]
            for r in mine:
                if r.snap.key == snap.key:
                    return r.export(self.s.port, self.s.tls)
            if not mine:
                raise DiskError(f"{mac} has no boot in progress (prepare_boot first)", status=409)
            boot = mine[0].boot
            n = 1 + max(int(Path(r.overlay).name.split(".")[2]) if not r.persistent else 0 for r in mine)
            path = str(self.overlays.ephemeral_path(mac, boot, n))
            await self._create_overlay(snap.path, path)
            row = await self._add(mac, boot, False, snap, path, False, server_ip, time.time())
        return row.export(self.s.port, self.s.tls)

    def export_for(self, mac: str, snapshot: Any = None) -> Optional[Export]:
        """The current boot's export (of that snapshot; None = the boot's main one), without I/O."""
        try:
            mac = norm_mac(mac)
        except DiskError:
            return None
        key = None
        if snapshot is not None:
            if isinstance(snapshot, SnapshotRef):
                key = snapshot.key
            elif hasattr(snapshot, "id"):
                key = str(snapshot.id)
            elif isinstance(snapshot, int) or str(snapshot).isdigit():
                key = str(snapshot)
            else:
                key = f"file:{os.path.realpath(os.fspath(snapshot))}"
        for r in self._rows.values():
            if r.mac == mac and (r.snap.key == key if key is not None else r.main):
                return r.export(self.s.port, self.s.tls)
        return None

    def snapshots_in_use(self) -> dict[str, list[str]]:
        """{snapshot key: [who]} for every base under a running export or a persistent layer."""
        out: dict[str, list[str]] = {}
        for r in self._rows.values():
            out.setdefault(r.snap.key, []).append(f"export of {r.mac} (boot {r.boot})")
        for r in self.tables.layers():
            out.setdefault(r["snapshot_key"], []).append(f"persistent layer of {r['mac']}")
        return out

    def open_check(self, snapshot: Any) -> list[str]:
        """For the snapshot store's register_open_check: who has this snapshot open."""
        return self.snapshots_in_use().get(str(getattr(snapshot, "id", snapshot)), [])

    # -- admin operations -----------------------------------------------------------------------------
    async def reset(self, mac: str) -> dict:
        """Throw away the host's disk changes: its persistent layer (and any running export of it)."""
        mac = norm_mac(mac)
        async with self._mac_lock(mac):
            rows = [r for r in self._rows.values() if r.mac == mac]
            layer = self.tables.layer(mac)
            if not rows and layer is None:
                raise DiskError(f"{mac} has no disk", status=404)
            # files first, rows after: on a full filesystem the state store can only write once the
            # overlay's space is back (a row whose file is gone is dropped at the next start)
            for r in rows:
                del self._rows[r.name]
                await self._teardown(r, delete_file=r.overlay != r.snap.path)  # never a draft's own file
            if layer is not None:
                self.overlays.remove(layer["path"])
            self.tables.drop_exports([r.name for r in rows], layer_of=mac)
        self.store.record_event(mac, "disk", {"action": "reset"})
        return {"mac": mac, "exports_removed": len(rows), "layer_removed": layer is not None}

    async def commit(self, mac: str, note: str = "", force: bool = False) -> dict:
        """Turn a persistent host's layer into a draft of its image (via the snapshot store): the store
        makes an empty draft over the layer's snapshot, the layer is re-pointed at that draft (same
        content, so an unsafe rebase is exact) and committed into it. The host starts clean next boot."""
        mac = norm_mac(mac)
        snapshots = self.snapshot_store()
        if snapshots is None:
            raise DiskError("no snapshot store: commit needs one", status=501)
        async with self._mac_lock(mac):
            layer = self.tables.layer(mac)
            if layer is None:
                raise DiskError(f"{mac} has no persistent layer to commit", status=404)
            if layer["snapshot_id"] is None:
                raise DiskError("this layer is over a bare file, not a snapshot of the store", status=409)
            rows = [r for r in self._rows.values() if r.mac == mac and r.overlay == layer["path"]]
            if rows and self._connected(mac) and not force:
                raise DiskError(f"{mac} is connected to this disk; shut it down first (or --force)", status=409)
            for r in rows:
                self._forget(r)
                await self._teardown(r, delete_file=False)
            draft = await asyncio.to_thread(snapshots.draft_from_layer, layer["snapshot_id"], layer["path"], note)
            self.tables.drop_layer(mac)
            self.overlays.remove(layer["path"])
        self.store.record_event(mac, "disk", {"action": "commit", "draft": draft.name})
        return {"mac": mac, "draft": draft.name, "draft_id": draft.id}

    async def list(self) -> list[dict]:
        """One entry per export and per idle persistent layer: what `bootctl disk list` shows."""
        stats = {}
        try:
            for s in await self.qsd.execute("query-blockstats", {"query-nodes": True}):
                if s.get("node-name"):
                    stats[s["node-name"]] = s["stats"]
        except DiskError:
            pass
        conn = self._peer_ips()
        out = []
        seen_layers = set()
        for r in sorted(self._rows.values(), key=lambda r: (r.mac, not r.main)):
            st = stats.get(r.node, {})
            io = self.export_io(r.name)
            # a connection the splicer counts, or any from the host's addresses (one an earlier bootd's
            # splicer still carries after a kill -9 is counted by no one here)
            connected = bool(io and io["connections"]) or self._connected(r.mac, conn)
            if r.persistent:
                seen_layers.add(r.overlay)
            out.append({"mac": r.mac, "host": self.host_name(r.mac) or r.mac, "export": r.name,
                        "snapshot": r.snap.name, "snapshot_id": r.snap.id, "persistent": r.persistent,
                        "boot": r.boot, "main": r.main, "size": r.size,
                        "overlay_bytes": allocated_bytes(r.overlay), "overlay_max": self.overlay_limit(r),
                        "overlay_full": r.full,
                        "connected": connected,
                        "since": r.created, "last_active": max(r.last_active, time.time() if connected else 0),
                        "wr_highest_offset": st.get("wr_highest_offset"), "uri": r.export(self.s.port, False).uri,
                        **(io or {})})
        for lr in self.tables.layers():
            if lr["path"] in seen_layers:
                continue
            out.append({"mac": lr["mac"], "host": self.host_name(lr["mac"]) or lr["mac"], "export": None,
                        "snapshot": lr["snapshot_name"], "snapshot_id": lr["snapshot_id"], "persistent": True,
                        "boot": None, "main": True, "size": None, "overlay_bytes": allocated_bytes(lr["path"]),
                        "connected": False, "since": lr["created"], "last_active": None,
                        "wr_highest_offset": None, "uri": None})
        return out

    def space(self) -> SpaceReport:
        rep = self.overlays.space(self.s.warn_free_percent, self.s.warn_free_bytes)
        self.last_space = rep
        if rep.low and not self._space_low:
            log.warning("disk directory %s is nearly full: %d MiB free (warning below %d MiB)",
                        rep.path, rep.free >> 20, rep.warn_below >> 20)
            self._inc("space_low_warnings")
        elif not rep.low and self._space_low:
            log.info("disk directory %s has room again: %d MiB free", rep.path, rep.free >> 20)
        self._space_low = rep.low
        return rep

    def status(self) -> dict:
        rep = self.last_space
        path, why = self.data_path()
        return {"exports": len(self._rows), "data_path": path, "data_path_reason": why,
                "qsd": self.qsd.status(), "aio": self.aio,
                "aio_error": self.aio_error, "subclusters": self.s.subclusters,
                "gatekeeper": (self.gatekeeper.status() if self.gatekeeper is not None
                               else {"error": self.gatekeeper_error} if self.gatekeeper_error else None),
                "free_mb": rep.free >> 20 if rep else None, "space_low": bool(rep and rep.low)}

    def data_path(self) -> tuple[str, Optional[str]]:
        """How negotiated NBD connections reach the daemon (handoff / splicer / python-relay), and why not
        faster; "direct" when the daemon serves TCP itself (nbd.gatekeeper: false: no per-host policy)."""
        if self.gatekeeper is not None:
            return self.gatekeeper.data_path()
        if self._daemon_socket is None:
            return "direct", "nbd.gatekeeper is false: any client can list and open every export"
        return "refused", self.gatekeeper_error or "the NBD gatekeeper is not running"

    def warning(self) -> Optional[str]:
        """One line for the unit's STATUS= when disks are served in a degraded or unsafe way."""
        path, why = self.data_path()
        if path in ("python-relay", "refused") and not self.s.tls:
            return f"NBD data path {path}: {why}"
        if path == "direct":
            return "NBD without access control (nbd.gatekeeper: false)"
        return None

    def export_io(self, name: str) -> Optional[dict]:
        """Bytes and requests read and written through export `name` and its live connections, as the
        hand-off library and the splicer counted them (None without the gatekeeper: qemu 7.2 counts
        nothing per NBD export)."""
        if self.gatekeeper is None:
            return None
        io = self.gatekeeper.splicer.io(name)
        for k, v in self.gatekeeper.relay_io(name).items():
            io[k] = io.get(k, 0) + v
        if self.handoff is not None:
            for k, v in self.handoff.io(name).items():
                io[k] = io.get(k, 0) + v
        return io

    def gauges(self) -> dict[str, float]:
        rep = self.last_space
        out = {"exports": len(self._rows), "qsd_restarts": self.qsd.restarts, "qsd_up": int(self.qsd.up.is_set())}
        if self.qsd.pid:  # the daemon's I/O: per-export byte counts are not in qemu 7.2's query-blockstats
            try:
                with open(f"/proc/{self.qsd.pid}/io") as f:
                    io = dict(line.split(": ") for line in f.read().splitlines())
                out["qsd_read_bytes"] = int(io["read_bytes"])
                out["qsd_write_bytes"] = int(io["write_bytes"])
                out["qsd_rchar"] = int(io["rchar"])
                out["qsd_wchar"] = int(io["wchar"])
            except (OSError, KeyError, ValueError):
                pass
        if rep:
            out["free_bytes"] = rep.free
            out["space_low"] = int(rep.low)
        out["overlay_bytes"] = sum(allocated_bytes(r.overlay) for r in self._rows.values())
        for r in self._rows.values():  # per export, labelled by host (the export name is a secret)
            io = self.export_io(r.name)
            if io is None:
                break
            host = str(self.host_name(r.mac) or r.mac).replace("\\", "\\\\").replace('"', '\\"')
            labels = f'{{host="{host}",mac="{r.mac}",disk="{"main" if r.main else r.node}"}}'
            for k in ("read_bytes", "written_bytes", "read_requests", "write_requests", "connections"):
                out[f"export_{k}{labels}"] = io[k]
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _mac_lock(self, mac: str) -> asyncio.Lock:
        return self._mac_locks.setdefault(mac, asyncio.Lock())

    def _snapshot(self, mac: str, snapshot: Any) -> SnapshotRef:
        if snapshot is None:
            snapshot = self.resolve_snapshot(mac)
            if snapshot is None:
                raise DiskError(f"no snapshot to boot for {mac}", status=404)
        return SnapshotRef.of(snapshot, self.snapshot_store())

    def _check_room(self) -> None:
        rep = self.space()
        if rep.free < (1 << 20):
            raise NoSpace(f"disk directory {rep.path} is full ({rep.free} bytes free)")

    def _layer_path(self, mac: str) -> Optional[str]:
        """The host's persistent layer file, if it has one on disk."""
        layer = self.tables.layer(mac)
        return layer["path"] if layer is not None and os.path.exists(layer["path"]) else None

    async def _create_overlay(self, base: str, path: str) -> None:
        self._check_room()
        if not os.path.exists(base):
            raise DiskError(f"snapshot file missing: {base}", status=404)
        if not self.overlays.has_template(base):
            async with self._base_locks.setdefault("template:" + base, asyncio.Lock()):
                await asyncio.to_thread(self.overlays.template_for, base)  # qemu-img, once per base
        self.overlays.create(base, Path(path))  # a file copy: cheaper than a thread hop

    async def _persistent_layer(self, mac: str, snap: SnapshotRef) -> tuple[str, SnapshotRef]:
        """The host's layer, made on its first boot; it stays on the snapshot it was made over (a
        newer snapshot for its group does not reach it until `bootctl disk reset`)."""
        r = self.tables.layer(mac)
        if r is not None and os.path.exists(r["path"]):
            return r["path"], SnapshotRef(r["snapshot_key"], r["snapshot_name"], r["base_path"], r["snapshot_id"])
        path = str(self.overlays.persistent_path(mac))
        await self._create_overlay(snap.path, path)
        self.tables.put_layer(mac, path, snap.key, snap.id, snap.name, snap.path, time.time())
        return path, snap

    async def _add(self, mac: str, boot: int, main: bool, snap: SnapshotRef, overlay: str, persistent: bool,
                   server_ip: Optional[str], now: float) -> _Row:
        name = secrets.token_urlsafe(18)
        node = "ov" + secrets.token_hex(8)
        addrs = self.s.listen_all or [self.s.listen]
        row = _Row(name, mac, boot, main, snap, overlay, node, persistent, 0,
                   server_ip if server_ip in addrs else self.s.listen, now, now)
        self._insert(row)  # intent first: a restore after a crash re-adds it
        self._rows[name] = row
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
                self._forget(row)
                raise StorageDaemonDown("the storage daemon did not come back within 15 s") from None
            except Exception:
                self._forget(row)
                raise
        except Exception:
            self._forget(row)
            raise
        if self.s.check_exports:
            try:
                size = await asyncio.to_thread(check_export, "127.0.0.1" if self.s.listen in ("0.0.0.0", "::")
                                               else self.s.listen, self.s.port, name, None,
                                               # the daemon's private socket has no TLS (the gatekeeper's is)
                                               None if self._daemon_socket else self.s.client_tls,
                                               unix=self._daemon_socket() if self._daemon_socket else None)
            except DiskError:
                self._inc("check_failed")
                self._forget(row)
                self._spawn_teardown(row)
                raise
            row.size = size
            self.tables.set_export_size(name, size)
        self._inc("exports_added")
        return row

    def _forget(self, row: _Row, stored: bool = True) -> None:
        """The export is no more: in memory (nobody opens it), and in the state store unless `stored`
        is False (the caller deletes the row itself, after freeing the file)."""
        self._rows.pop(row.name, None)
        if self.gatekeeper is not None:
            self.gatekeeper.forget(row.name)
        if self.handoff is not None:
            self.handoff.forget(row.name)
        if stored:
            self.tables.drop_exports([row.name])

    async def _base_node(self, path: str) -> str:
        node = self._bases.get(path)
        if node:
            return node
        lock = self._base_locks.setdefault(path, asyncio.Lock())
        async with lock:
            node = self._bases.get(path)
            if node:
                return node
            node = "b" + hashlib.sha1(path.encode()).hexdigest()[:16]
            await self.qsd.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, "read-only": True, "file": self._file(path, "f" + node)})
            self._bases[path] = node
            return node

    def _capped(self, row: _Row) -> dict:
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
        if not self.s.overlay_max or row.overlay == row.snap.path:  # no limit, or a draft (no overlay)
            return spec
        step = 64 << 10
        length = os.stat(row.overlay).st_size
        size = max(self.s.overlay_max // step * step, -(-length // step) * step)
        if length < size:
            os.truncate(row.overlay, size)
        return {"driver": "raw", "node-name": "c" + row.node, "offset": 0, "size": size, "file": spec}

    def _overlay_full(self, node: str) -> None:
        """qemu's BLOCK_WRITE_THRESHOLD on an overlay's size-limited node: a write went past
        nbd.overlay_max and was refused (ENOSPC to that host). Said once per export."""
        row = next((r for r in self._rows.values() if "c" + r.node == node), None)
        if row is None or row.full:
            return
        row.full = True
        limit = self.overlay_limit(row) or 0
        log.warning("the disk of %s reached nbd.overlay_max (%d MiB): its writes fail with ENOSPC until its "
                    "next boot or `bootctl disk reset`", self.host_name(row.mac) or row.mac, limit >> 20)
        self._inc("overlay_full")
        try:
            self.store.record_event(row.mac, "disk", {"action": "overlay-full", "limit": limit})
        except Exception as e:  # e.g. a full state store: the log line above is enough
            log.debug("recording overlay-full of %s: %s", row.mac, e)

    def overlay_limit(self, row: _Row) -> Optional[int]:
        """The bytes this export's overlay may grow to (None: no limit)."""
        if not self.s.overlay_max or row.overlay == row.snap.path:
            return None
        try:
            return max(self.s.overlay_max, os.stat(row.overlay).st_size)
        except OSError:
            return self.s.overlay_max

    async def _export(self, row: _Row) -> None:
        spec = {"driver": "qcow2", "node-name": row.node, "file": self._capped(row)}
        if row.overlay != row.snap.path:  # an overlay: its backing is the shared, never exported base node
            spec["backing"] = await self._base_node(row.snap.path)
        # all commands in flight at once (QMP runs them in order): one round trip to the daemon
        commands = [
            self.qsd.execute("blockdev-add", spec),
            self.qsd.execute("block-export-add", {
                "type": "nbd", "id": row.node, "node-name": row.node, "name": row.name, "writable": True})]
        capped = spec["file"]
        if capped["driver"] == "raw":  # tell bootd when a write hits the limit (see _capped, _overlay_full)
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

    def _spawn_teardown(self, row: _Row) -> None:
        t = asyncio.get_running_loop().create_task(self._teardown(row, delete_file=not row.persistent))
        self._teardowns.add(t)
        t.add_done_callback(self._teardowns.discard)

    async def _teardown(self, row: _Row, delete_file: bool) -> None:
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

    async def _release_base(self, path: str) -> None:
        if any(r.snap.path == path and r.overlay != path for r in self._rows.values()):
            return
        lock = self._base_locks.setdefault(path, asyncio.Lock())
        async with lock:
            node = self._bases.get(path)
            if node is None or any(r.snap.path == path and r.overlay != path for r in self._rows.values()):
                return
            try:
                await self.qsd.execute("blockdev-del", {"node-name": node})
                self._bases.pop(path, None)
            except DiskError as e:
                if "in use" not in str(e):
                    log.warning("cannot remove base node for %s: %s", path, e)

    async def _restore(self) -> None:
        """Make the daemon's exports equal to the running boots in the state store (after a start, an
        adoption or a restart of the daemon). Caller holds qsd.lock."""
        await self._choose_aio()
        exps = {e["id"]: e for e in await self.qsd.execute("query-block-exports")}
        nodes = {n["node-name"] for n in await self.qsd.execute("query-named-block-nodes", {"flat": True})}
        self._bases = {}
        wanted = {r.node for r in self._rows.values()}
        for eid in list(exps):
            if eid not in wanted:
                await self.qsd.execute("block-export-del", {"id": eid, "mode": "hard"})
        for r in list(self._rows.values()):
            base = "b" + hashlib.sha1(r.snap.path.encode()).hexdigest()[:16]
            if base in nodes and r.overlay != r.snap.path:
                self._bases[r.snap.path] = base
            if r.node in exps:
                continue
            if not os.path.exists(r.overlay) or not os.path.exists(r.snap.path):
                log.warning("export of %s lost its file (%s); dropping it", r.mac, r.overlay)
                self._forget(r)
                continue
            try:
                if r.node in nodes:
                    await self.qsd.execute("block-export-add", {"type": "nbd", "id": r.node, "node-name": r.node,
                                                                "name": r.name, "writable": True})
                else:
                    await self._export(r)
                self._inc("exports_restored")
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
        if self._rows:
            log.info("storage daemon serves %d export(s) of running boots", len(self._rows))

    # -- reaping --------------------------------------------------------------------------------------
    def _peer_ips(self) -> dict[str, int]:
        return peers(self.s.port, self.qsd.pid)

    def _host_ips(self, mac: str) -> set[str]:
        """Addresses the host was seen at (lease, last address, configured one): for reaping only, to
        tell whether it is still connected; never who may open an export (that is _peer_mac)."""
        ips = set(self.extra_ips(mac) or ())
        host = self.store.host(mac)
        if host and host.get("last_ip"):
            ips.add(host["last_ip"])
        try:
            ips.update(self.store.bound_ips(mac))
        except Exception:  # no lease table in a bare state file
            pass
        return ips

    def _connected(self, mac: str, conn: Optional[dict] = None) -> bool:
        conn = self._peer_ips() if conn is None else conn
        return any(conn.get(ip) for ip in self._host_ips(mac))

    async def reap_once(self, now: Optional[float] = None) -> list[str]:
        """Drop exports of hosts that went away: not connected for `reap_after` seconds since their
        boot or their last seen connection. Returns the MACs reaped."""
        now = time.time() if now is None else now
        self.space()
        conn = self._peer_ips()
        by_mac: dict[str, list[_Row]] = {}
        for r in self._rows.values():
            by_mac.setdefault(r.mac, []).append(r)
        reaped = []
        for mac, rows in by_mac.items():
            if self._connected(mac, conn):
                for r in rows:
                    r.last_active = now
                try:
                    self.tables.touch_exports(mac, now)
                except sqlite3.Error as e:  # a full filesystem: reaping must still go on (it frees space)
                    log.warning("cannot store the last activity of %s: %s", mac, e)
                continue
            if now - max(r.last_active for r in rows) < self.s.reap_after:
                continue
            async with self._mac_lock(mac):
                rows = [r for r in self._rows.values() if r.mac == mac]
                for r in rows:  # the file first, then the row: on a full filesystem only that order works
                    self._forget(r, stored=False)
                    await self._teardown(r, delete_file=not r.persistent)
                self.tables.drop_exports([r.name for r in rows])
            reaped.append(mac)
            self._inc("reaped")
            log.info("reaped the disk of %s (gone for %.0f s)", mac, now - max(r.last_active for r in rows))
        return reaped

    async def _reap_loop(self) -> None:
        while True:
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("reaper: %s", e)
            await asyncio.sleep(self.s.reap_interval)
