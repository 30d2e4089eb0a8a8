"""The Booter: given a PC, what it boots (Pixiecore's Booter seam).

`Booter.menu_for(mac, server_ip)` picks the host's effective settings from the config, asks the
catalog for its entries, gets the host's NBD exports (a new boot: `ctx.disks.prepare_boot`) and
returns a `BootMenu` whose items carry complete kernel command lines. The renderers turn it into
iPXE, pxelinux or GRUB text; `render(menu, flavour)` picks one.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any, Optional

from bootd.config import Config, normalize_mac
from pxe.catalog import BootHost, Catalog, CatalogEntry, ConfigCatalog, boot_host
from pxe.grub import render_grub
from pxe.ipxe import render_ipxe
from pxe.menu import LOCAL_KEY, BootMenu, MenuItem
from pxe.pxelinux import render_pxelinux
from pxe.tokens import fallback_token

log = logging.getLogger("bootd.pxe")

RENDERERS = {"ipxe": render_ipxe, "pxelinux": render_pxelinux, "grub": render_grub}


def render(menu: BootMenu, flavour: str) -> str:
    try:
        return RENDERERS[flavour](menu)
    except KeyError:
        raise ValueError(f"unknown menu flavour {flavour!r} (ipxe, pxelinux, grub)") from None


def server_for(config: Config, client_ip: Optional[str]) -> Optional[str]:
    """bootd's address on the interface whose subnet holds `client_ip` (else the first interface's)."""
    if client_ip:
        try:
            addr = ipaddress.ip_address(client_ip)
            for iface in config.interfaces:
                if addr in iface.subnet:
                    return str(iface.address.ip)
        except ValueError:
            pass
    return config.server_ip


class Booter:
    """What a host boots, for every protocol that asks (HTTP script, TFTP menus)."""

    def __init__(self, ctx: Any, catalog: Optional[Catalog] = None):
        self.ctx = ctx
        self._catalog = catalog

    # -- the catalog -------------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """The explicit catalog, else the snapshot store's when it runs, else the config's images."""
        if self._catalog is not None:
            return self._catalog
        if getattr(self.ctx, "snapshots", None) is not None:
            try:
                from snapshots.catalog import SnapshotCatalog
            except ImportError:
                pass
            else:
                return SnapshotCatalog(self.ctx.snapshots, self.ctx.config)
        return ConfigCatalog(self.ctx.config)

    def host(self, mac: str) -> BootHost:
        return boot_host(self.ctx.config, mac)

    def entries(self, host: BootHost) -> list[CatalogEntry]:
        entries = list(self.catalog().entries_for(host))
        if not entries and self._catalog is None and getattr(self.ctx, "snapshots", None) is not None:
            # Images with no snapshot yet still boot their kernel (with no disk to attach).
            entries = ConfigCatalog(self.ctx.config).entries_for(host)
        return entries

    # -- the menu ------------------------------------------------------------------------------------
    async def menu_for(self, mac: Optional[str], server_ip: Optional[str] = None, *,
                       new_boot: bool = True, preview: bool = False) -> BootMenu:
        """The host's menu. `new_boot`: this fetch starts a boot (fresh disk overlays are made).
        `preview`: for admins, changes nothing (disks: the current boot's exports, if any)."""
        cfg: Config = self.ctx.config
        server = server_ip or cfg.server_ip or "127.0.0.1"
        http_base = f"http://{_url_host(server)}:{cfg.http.port}"
        notes: list[str] = []
        if mac is None:
            host = BootHost(mac="", name=None, group=None, images=tuple(i.name for i in cfg.images),
                            default_image=cfg.images[0].name if cfg.images else None, boot="pxelinux",
                            persistent=False)
            notes.append("client MAC unknown: no disk and no client config on the command lines")
        else:
            host = self.host(mac)
        entries = self.entries(host)
        if not cfg.menu.previous_snapshot_entry:
            entries = [e for e in entries if not e.previous]
        # current snapshots first, then the "previous snapshot" entries, then the local disk
        entries = [e for e in entries if not e.previous] + [e for e in entries if e.previous]
        sids = self._snapshot_ids(host, entries)
        if not mac:
            nbd = {}
        elif preview:
            nbd = self._current_nbd_args(host, entries, sids, server, notes)
        else:
            nbd = await self._nbd_args(host, entries, sids, server, new_boot, notes)
        items: list[MenuItem] = []
        default = None
        seen: set[str] = set()
        for e in entries:
            if e.key in seen or e.key == LOCAL_KEY:
                notes.append(f"duplicate or reserved menu key {e.key!r} skipped")
                continue
            seen.add(e.key)
            items.append(MenuItem(key=e.key, title=e.title, kind="linux", kernel=e.kernel, initrd=e.initrd,
                                  cmdline=self._cmdline(host, e, server, http_base, nbd.get(e.key),
                                                        sids.get(e.key)),
                                  image=e.image, snapshot_id=sids.get(e.key), version=e.version,
                                  previous=e.previous))
            if e.default and default is None:
                default = e.key
        if cfg.menu.local_disk_entry or not items:
            items.append(MenuItem(key=LOCAL_KEY, title="Boot from local disk", kind="local"))
        if default is None:
            default = next((it.key for it in items if not it.previous), items[0].key)
        title = cfg.menu.title + (f": {host.name}" if host.name else "")
        return BootMenu(mac=host.mac or None, host_name=host.name, title=title, timeout=cfg.menu.timeout,
                        default=default, items=tuple(items), server=server, http_base=http_base,
                        pxelinux_ui=cfg.menu.pxelinux_ui, notes=tuple(notes))

    def _snapshot_ids(self, host: BootHost, entries: list[CatalogEntry]) -> dict[str, Optional[int]]:
        """Each entry's snapshot: the catalog's, else what the snapshot store resolves for the host."""
        store = getattr(self.ctx, "snapshots", None)
        out: dict[str, Optional[int]] = {}
        for e in entries:
            sid = e.snapshot_id
            if sid is None and store is not None and host.mac:
                try:
                    snap = store.resolve_for_host(host.mac, host.group, e.image)
                except Exception as exc:
                    log.warning("cannot resolve %s for %s: %s", e.image, host.mac, exc, extra={"mac": host.mac})
                    snap = None
                sid = snap.id if snap is not None else None
            out[e.key] = sid
        return out

    async def _nbd_args(self, host: BootHost, entries: list[CatalogEntry], sids: dict[str, Optional[int]],
                        server: str, new_boot: bool, notes: list[str]) -> dict[str, str]:
        """`bootd.nbd=HOST:PORT/EXPORT` per entry key, from the NBD engine (or the fallback token)."""
        cfg: Config = self.ctx.config
        disks = getattr(self.ctx, "disks", None)
        out: dict[str, str] = {}
        if not cfg.nbd.enabled or not entries:
            return out
        if disks is None:
            token = fallback_token(self.ctx.store, host.mac)
            arg = f"bootd.nbd={_url_host(server)}:{cfg.nbd.port}/{token}"
            return {e.key: arg for e in entries}
        default = next((e for e in entries if e.default), entries[0])
        main_sid = sids.get(default.key)
        try:
            if new_boot or disks.export_for(host.mac) is None:
                await disks.prepare_boot(host.mac, snapshot=main_sid, server_ip=server)
        except Exception as exc:  # DiskError: no snapshot, disk full, storage daemon down
            log.error("no disk for %s: %s", host.mac, exc, extra={"mac": host.mac})
            notes.append(f"no disk: {exc}")
            self.ctx.store.record_event(host.mac, "disk", {"message": f"menu: no disk: {exc}"})
            return out
        for e in entries:
            sid = sids.get(e.key)
            try:
                if sid is None:
                    # no snapshot known for this entry: only the default shares the boot's main disk
                    exp = disks.export_for(host.mac) if e is default else None
                elif sid == main_sid:
                    exp = disks.export_for(host.mac, sid) or disks.export_for(host.mac)
                else:
                    exp = await disks.prepare_export(host.mac, sid, server_ip=server)
            except Exception as exc:
                log.error("no disk for %s entry %s: %s", host.mac, e.key, exc, extra={"mac": host.mac})
                notes.append(f"{e.key}: no disk: {exc}")
                continue
            if exp is None:
                notes.append(f"{e.key}: no snapshot of {e.image} to boot: no disk on its command line")
            else:
                out[e.key] = exp.cmdline
        return out

    def _current_nbd_args(self, host: BootHost, entries: list[CatalogEntry], sids: dict[str, Optional[int]],
                          server: str, notes: list[str]) -> dict[str, str]:
        """The exports the host's current boot has (no I/O, nothing made)."""
        cfg: Config = self.ctx.config
        disks = getattr(self.ctx, "disks", None)
        if not cfg.nbd.enabled or not entries:
            return {}
        if disks is None:
            token = fallback_token(self.ctx.store, host.mac)
            return {e.key: f"bootd.nbd={_url_host(server)}:{cfg.nbd.port}/{token}" for e in entries}
        out = {}
        for e in entries:
            sid = sids.get(e.key)
            exp = disks.export_for(host.mac, sid) if sid is not None else None
            if exp is None and e.default:
                exp = disks.export_for(host.mac)
            if exp is not None:
                out[e.key] = exp.cmdline
        if len(out) < len(entries):
            notes.append("preview: disk exports are made when the PC fetches its menu; entries without "
                         "one show no bootd.nbd")
        return out

    def _cmdline(self, host: BootHost, e: CatalogEntry, server: str, http_base: str,
                 nbd: Optional[str], sid: Optional[int]) -> str:
        cfg: Config = self.ctx.config
        parts = [cfg.menu.cmdline, e.cmdline, f"bootd.server={server}"]
        if nbd:
            parts.append(nbd)
        if host.mac:
            parts.append(f"bootd.config={http_base}/clients/{host.mac}/")
        parts.append(f"bootd.image={e.image}")
        if sid is not None:
            parts.append(f"bootd.snapshot={sid}")
        nfs = _nfs_cmdline(self.ctx, host)
        if nfs:
            parts.append(nfs)
        return " ".join(p.strip() for p in parts if p and p.strip())


def _nfs_cmdline(ctx: Any, host: BootHost) -> str:
    """The client root's NFS arguments when the client helper's bootd.nfs offers them."""
    try:
        from bootd import nfs
    except ImportError:
        return ""
    fn = getattr(nfs, "cmdline_for", None)
    if fn is None or not host.mac:
        return ""
    try:
        return fn(ctx.config, host.mac) or ""
    except Exception as exc:
        log.warning("nfs cmdline for %s: %s", host.mac, exc, extra={"mac": host.mac})
        return ""


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def parse_mac(text: str) -> Optional[str]:
    """A MAC in any of the spellings firmware uses (aa:bb.., aa-bb.., aabbcc..), or None."""
    t = text.strip().lower()
    if len(t) == 12 and all(c in "0123456789abcdef" for c in t):
        t = ":".join(t[i:i + 2] for i in range(0, 12, 2))
    try:
        return normalize_mac(t)
    except ValueError:
        return None
