"""DiskService: puts a DiskManager on `ctx.disks` for the daemon's lifetime."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from bootd.config import Config, HostConfig
from bootd.service import Service
from nbdexport.check import ClientTls
from nbdexport.errors import DiskError
from nbdexport.manager import DiskManager
from nbdexport.model import DiskSettings
from nbdexport.qsd import StorageDaemon, TlsSettings
from snapshots.model import Snapshot

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.nbd")


def disk_directory(config: Config) -> str:
    return config.nbd.directory or str(Path(config.storage.directory) / "disks")


def listen_addresses(config: Config) -> list[str]:
    """nbd.listen, else every served interface's address; empty (no NBD at all) without either:
    disks are served on the served networks only, never on an address nobody configured."""
    if config.nbd.listen is not None:
        return [str(config.nbd.listen)]
    return [str(i.address.ip) for i in config.interfaces]


def listen_address(config: Config) -> Optional[str]:
    addrs = listen_addresses(config)
    return addrs[0] if addrs else None


def run_directory(config: Config) -> str:
    """QMP socket, pid file and log of the storage daemon: next to the overlays (one per storage)."""
    return config.nbd.run_dir or os.path.join(disk_directory(config), "run")


def tls_settings(config: Config) -> tuple[Optional[TlsSettings], Optional[ClientTls]]:
    t = config.nbd.tls
    if t is None:
        return None, None
    server = TlsSettings(t.mode, t.dir, t.verify_peer)
    if t.mode == "psk":
        keys = os.path.join(t.dir, "keys.psk")
        user = t.psk_username
        if user is None:
            try:
                user = Path(keys).read_text().split(":", 1)[0].strip()
            except OSError as e:
                raise DiskError(f"nbd.tls: cannot read {keys}: {e.strerror}") from e
        return server, ClientTls("psk", psk_file=keys, username=user)
    if t.client_dir:
        return server, ClientTls("x509", cert_dir=t.client_dir)
    return server, None


def settings_from(config: Config) -> tuple[DiskSettings, Optional[TlsSettings]]:
    """The manager's settings (with no NBD address, listen is empty: the service starts no manager then)."""
    addresses = listen_addresses(config)
    server_tls, client_tls = tls_settings(config)
    n = config.nbd
    check = n.check_exports
    gatekeeper = n.gatekeeper
    if server_tls is not None and client_tls is None and check and not gatekeeper:
        # (behind the gatekeeper bootd checks on the daemon's private socket, which has no TLS)
        log.warning("nbd.tls x509 without client_dir: exports cannot be checked with libnbd; checks off")
        check = False
    return DiskSettings(
        directory=disk_directory(config), run_dir=run_directory(config), listen=addresses[0] if addresses else "",
        listen_all=addresses,
        port=n.port, reap_after=n.reap_after, reap_interval=n.reap_interval,
        maintenance_release_after=n.maintenance_release_after,
        warn_free_percent=n.warn_free_percent, warn_free_bytes=config.storage.min_free_mb << 20,
        check_exports=check, tls=server_tls is not None, client_tls=client_tls,
        gatekeeper=gatekeeper, aio=n.aio, subclusters=n.subclusters, handoff=n.handoff, overlay_max=int(n.overlay_max),
        handshake_timeout=n.handshake_timeout, handshakes_per_address=n.handshakes_per_address), server_tls


class DiskService(Service):
    name = "disks"

    def __init__(self) -> None:
        self.manager: Optional[DiskManager] = None
        self.ctx: Optional[Context] = None
        self._key: Optional[tuple[object, ...]] = None  # what a reload cannot change without a restart
        self.error: Optional[str] = None

    @property
    def _context(self) -> Context:
        """The running service's context: the manager's policy callbacks run only while it runs."""
        if self.ctx is None:
            raise DiskError("the disk service is not running", status=503)
        return self.ctx

    async def start(self, ctx: Context) -> None:
        """Never fatal for the daemon: without disks bootd still serves DHCP, menus and files, and
        `bootctl status` says why the disks are off."""
        self.ctx = ctx
        self.error = None
        if not ctx.config.nbd.enabled:
            self.error = "disabled in the config"
            return
        if listen_address(ctx.config) is None:
            self.error = "no served interface and no nbd.listen"
            return
        try:
            await self._start(ctx)
        except Exception as e:
            self.error = str(e)
            log.error("disks over NBD are off: %s", e)
            if self.manager is not None:
                try:
                    await self.manager.stop()
                except Exception:
                    pass
            self.manager = None

    async def _start(self, ctx: Context) -> None:
        settings, server_tls = settings_from(ctx.config)
        self._key = (settings.directory, settings.run_dir, tuple(settings.listen_all), settings.port, server_tls,
                     ctx.config.nbd.qsd_binary, settings.gatekeeper)

        def on_event(kind: str, detail: dict[str, Any]) -> None:
            ctx.metrics.inc("nbd", f"qsd_{kind}")
            ctx.store.record_event(None, "disk", {"action": f"storage-daemon-{kind}", **detail})

        qsd = StorageDaemon(settings.run_dir, settings.listen_all, settings.port, server_tls,
                            binary=ctx.config.nbd.qsd_binary, on_event=on_event)
        self.manager = DiskManager(settings, ctx.store, qsd,
                                   resolve_snapshot=self._resolve, is_persistent=self._persistent,
                                   snapshot_store=lambda: ctx.snapshots, host_name=self._host_name,
                                   extra_ips=self._configured_ip,
                                   metrics=ctx.metrics,
                                   owner_of=self._owner_of)
        await self.manager.start()
        if self.manager.gatekeeper is not None:
            self.manager.gatekeeper.on_refused = self._refused
        ctx.disks = self.manager
        ctx.metrics.add_gauges("nbd", self.manager.gauges)
        store = ctx.snapshots
        if store is not None:
            store.register_open_check(self.manager.open_check)

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
            if self.ctx is not None and self.ctx.disks is self.manager:
                self.ctx.disks = None
        self.manager = None

    async def reload(self, ctx: Context) -> None:
        """Knobs like reap_after apply at once; a new address, port, directory or TLS restarts the
        storage daemon (clients reconnect to the same export names)."""
        if self.manager is None or not ctx.config.nbd.enabled or listen_address(ctx.config) is None:
            await self.stop()
            await self.start(ctx)
            return
        settings, server_tls = settings_from(ctx.config)
        key = (settings.directory, settings.run_dir, tuple(settings.listen_all), settings.port, server_tls,
               ctx.config.nbd.qsd_binary, settings.gatekeeper)
        if key != self._key:
            await self.stop()
            await self.start(ctx)
            return
        self.ctx = ctx
        self.manager.s = settings
        gk = self.manager.gatekeeper
        if gk is not None:  # handshake limits apply to the next connections
            gk.timeout, gk.per_address = settings.handshake_timeout, settings.handshakes_per_address

    def status(self) -> dict[str, Any]:
        if self.manager is None:
            return {"enabled": False, "reason": self.error}
        return self.manager.status()

    def warning(self) -> Optional[str]:
        if self.manager is None:
            return f"disks off: {self.error}" if self.error and self.error != "disabled in the config" else None
        return self.manager.warning()

    # -- policy from the config -------------------------------------------------------------------
    def _host_cfg(self, mac: str) -> Optional[HostConfig]:
        return self._context.config.host_by_mac(mac)

    def _persistent(self, mac: str) -> bool:
        """The boot plan's setting: host over group (bootd/bootplan.py)."""
        return self._context.planner.settings_for(mac).persistent

    def _refused(self, peer: str, name: Optional[str]) -> None:
        """An export the PC at `peer` asked for was not its own: a failed boot step on its timeline (the
        export name is a secret of its owner: only its first characters are kept)."""
        mac = self._owner_of(peer)
        if mac is None:
            return  # nobody known at that address: the gatekeeper's warning says it all
        from bootd.hoststate import record_failure
        record_failure(self._context.store, mac, "disk",
                       f"disk: NBD export {(name or '?')[:6]}… refused (not this PC's own)",
                       host=self._host_name(mac), client=peer)

    def _owner_of(self, ip: str) -> Optional[str]:
        """The MAC at `ip` by a live binding (bootd/peers.py, as for menus): the gatekeeper's policy."""
        from bootd.peers import mac_at
        return mac_at(self._context, ip)

    def _configured_ip(self, mac: str) -> list[str]:
        host = self._host_cfg(mac)
        return [str(host.ip)] if host is not None and host.ip is not None else []

    def _host_name(self, mac: str) -> Optional[str]:
        host = self._host_cfg(mac)
        if host is not None:
            return host.name
        row = self._context.store.host(mac)
        name = row.get("name") if row else None
        return str(name) if name is not None else None

    def _resolve(self, mac: str) -> Optional[Snapshot]:
        """The snapshot under the host's main disk when a boot names none (`bootctl disk boot`): the
        boot plan's, the same as its menu's default entry (bootd/bootplan.py)."""
        ctx = self._context
        store = ctx.snapshots
        if store is None:
            return None
        sid = ctx.planner.plan_for(mac).disk.snapshot_id
        return store.get(sid) if sid is not None else None
