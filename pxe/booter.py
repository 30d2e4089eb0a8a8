"""The Booter: given a PC, what it boots (Pixiecore's Booter seam).

`Booter.menu_for(mac, server_ip)` reads the host's boot plan (`ctx.planner`, bootd/bootplan.py: its
settings, entries with their snapshots, default entry and disks), gets the plan's NBD exports (a new
boot: `ctx.disks.prepare_boot`) and returns a `BootMenu` whose items carry complete kernel command
lines. The renderers turn it into iPXE, pxelinux or GRUB text; `render(menu, flavour)` picks one.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Optional

from bootd.bootplan import BootPlan, MenuEntry, Planner, anonymous_settings, boot_files, entry_key
from bootd.config import Config
from bootd.nfs import cmdline_for as nfs_cmdline_for
from pxe.catalog import BootHost, Catalog, CatalogEntry
from pxe.grub import render_grub
from pxe.ipxe import render_ipxe
from pxe.menu import LOCAL_KEY, BootMenu, MenuItem
from pxe.pxelinux import render_pxelinux
from pxe.tokens import fallback_token

if TYPE_CHECKING:
    from bootd.daemon import Context

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
    """What a host boots, for every protocol that asks (HTTP script, TFTP menus): the boot plan
    (`ctx.planner`, bootd/bootplan.py) rendered with disks and kernel command lines."""

    def __init__(self, ctx: Context, catalog: Optional[Catalog] = None):
        self.ctx = ctx
        self._catalog = catalog

    def plan(self, mac: Optional[str]) -> BootPlan:
        """The host's plan; with an explicit catalog, its entries under the plan's rules."""
        planner: Planner = self.ctx.planner
        if self._catalog is None:
            return planner.plan_for(mac)
        host = planner.settings_for(mac) if mac else anonymous_settings(self.ctx.config)
        return planner.plan_with(host, list(self._catalog.entries_for(host)))

    # -- the menu ------------------------------------------------------------------------------------
    async def menu_for(self, mac: Optional[str], server_ip: Optional[str] = None, *,
                       new_boot: bool = True, preview: bool = False) -> BootMenu:
        """The host's menu. `new_boot`: this fetch starts a boot (fresh disk overlays are made).
        `preview`: for admins, changes nothing (disks: the current boot's exports, if any)."""
        cfg: Config = self.ctx.config
        server = server_ip or cfg.server_ip or "127.0.0.1"
        http_base = f"http://{_url_host(server)}:{cfg.http.port}"
        plan = self.plan(mac)
        host = plan.settings
        notes: list[str] = []
        if mac is None:
            notes.append("client MAC unknown: no disk and no client config on the command lines")
        notes.extend(plan.notes)
        # pxelinux/GRUB rooms with a bootloader password: what students do not see, behind that password
        loader_hash = {"pxelinux": cfg.menu.admin_pxelinux_passwd, "grub": cfg.menu.admin_grub_pbkdf2}.get(host.boot)
        guarded = plan.hidden if mac and loader_hash else ()
        if not mac:
            nbd = {}
        elif preview:
            nbd = self._current_nbd_args(plan, server, notes)
        else:
            nbd = await self._nbd_args(plan, server, new_boot, notes, guarded)
        items = [MenuItem(key=e.key, title=e.title, kind="linux", kernel=e.kernel, initrd=e.initrd,
                          cmdline=self._cmdline(host, e, server, http_base, nbd.get(e.key), e.snapshot_id),
                          image=e.image, snapshot_id=e.snapshot_id, version=e.version, previous=e.previous)
                 for e in plan.entries]
        if cfg.menu.local_disk_entry or not items:
            items.append(MenuItem(key=LOCAL_KEY, title="Boot from local disk", kind="local"))
        admin_items = tuple(
            MenuItem(key=e.key, title=f"Admin: {e.title}", kind="linux", kernel=e.kernel, initrd=e.initrd,
                     cmdline=self._cmdline(host, e, server, http_base, nbd.get(e.key), e.snapshot_id),
                     image=e.image, snapshot_id=e.snapshot_id, version=e.version, previous=e.previous)
            for e in guarded)
        default = plan.default or LOCAL_KEY  # no entry to default to: the local disk (always present then)
        title = cfg.menu.title + (f": {host.name}" if host.name else "")
        admin_url = f"{http_base}/boot/admin/{host.mac}.ipxe" if host.mac and self._admin_entry() else None
        return BootMenu(mac=host.mac or None, host_name=host.name, title=title, timeout=cfg.menu.timeout,
                        default=default, items=tuple(items), server=server, http_base=http_base,
                        pxelinux_ui=cfg.menu.pxelinux_ui, notes=tuple(notes), admin_url=admin_url,
                        admin_items=admin_items, pxelinux_passwd=cfg.menu.admin_pxelinux_passwd,
                        grub_pbkdf2=cfg.menu.admin_grub_pbkdf2)

    async def boot_once(self, mac: str, image: str, snapshot_id: int, label: str,
                        server_ip: Optional[str] = None) -> BootMenu:
        """A one-entry menu (no wait) booting `snapshot_id` of `image` on `mac` once: the admin menu's
        "boot once" (issue 17). The disk is one more export in the PC's current boot; the plan is
        unchanged, so the next boot is the usual one."""
        cfg: Config = self.ctx.config
        server = server_ip or cfg.server_ip or "127.0.0.1"
        http_base = f"http://{_url_host(server)}:{cfg.http.port}"
        img = cfg.image(image)
        if img is None:
            raise ValueError(f"image {image} is not in the config")
        host = self.ctx.planner.settings_for(mac)
        entry = MenuEntry(entry_key(image, "once"), image, f"{img.title or image} ({label}, once)",
                          *boot_files(img, self.ctx.snapshots, snapshot_id), img.cmdline, snapshot_id=snapshot_id,
                          native=img.kind == "native")
        nbd: Optional[str] = None
        notes: list[str] = []
        if cfg.nbd.enabled and self.ctx.disks is not None:
            if self.ctx.disks.export_for(mac) is None:
                await self.ctx.disks.prepare_boot(mac, snapshot=snapshot_id, server_ip=server)
            nbd = (await self.ctx.disks.prepare_export(mac, snapshot_id, server_ip=server)).cmdline
        elif cfg.nbd.enabled:
            notes.append("no NBD manager running: the fallback export, not the chosen snapshot")
            nbd = f"bootd.nbd={_url_host(server)}:{cfg.nbd.port}/{fallback_token(self.ctx.store, mac)}"
        item = MenuItem(key=entry.key, title=entry.title, kind="linux", kernel=entry.kernel, initrd=entry.initrd,
                        cmdline=self._cmdline(host, entry, server, http_base, nbd, snapshot_id), image=image,
                        snapshot_id=snapshot_id)
        return BootMenu(mac=mac, host_name=host.name, title=cfg.menu.title, timeout=0, default=item.key,
                        items=(item,), server=server, http_base=http_base, notes=tuple(notes))

    def _admin_entry(self) -> bool:
        """The menu offers the admin login when it is enabled and some admin account exists to log in."""
        return self.ctx.config.menu.admin_entry and bool(self.ctx.store.admin_accounts())

    async def _nbd_args(self, plan: BootPlan, server: str, new_boot: bool, notes: list[str],
                        guarded: tuple[MenuEntry, ...] = ()) -> dict[str, str]:
        """`bootd.nbd=HOST:PORT/EXPORT` per entry key: the plan's main disk and its extra exports from
        the NBD engine (or the fallback token); also for the `guarded` (password-protected) entries."""
        cfg: Config = self.ctx.config
        disks = self.ctx.disks
        mac = plan.settings.mac
        out: dict[str, str] = {}
        if not cfg.nbd.enabled or not plan.entries:
            return out
        if disks is None:
            token = fallback_token(self.ctx.store, mac)
            arg = f"bootd.nbd={_url_host(server)}:{cfg.nbd.port}/{token}"
            return {e.key: arg for e in plan.entries + guarded}
        main_sid = plan.disk.snapshot_id
        try:
            if new_boot or disks.export_for(mac) is None:
                await disks.prepare_boot(mac, snapshot=main_sid, server_ip=server)
        except Exception as exc:  # DiskError: no snapshot, disk full, storage daemon down
            log.error("no disk for %s: %s", mac, exc, extra={"mac": mac})
            notes.append(f"no disk: {exc}")
            self.ctx.store.record_event(mac, "disk", {"message": f"menu: no disk: {exc}"})
            return out
        for e in plan.entries + guarded:
            sid = e.snapshot_id
            try:
                if sid is None:
                    # no snapshot known for this entry: only the default shares the boot's main disk
                    exp = disks.export_for(mac) if e.key == plan.default else None
                elif sid == main_sid:
                    exp = disks.export_for(mac, sid) or disks.export_for(mac)
                else:
                    exp = await disks.prepare_export(mac, sid, server_ip=server)
            except Exception as exc:
                log.error("no disk for %s entry %s: %s", mac, e.key, exc, extra={"mac": mac})
                notes.append(f"{e.key}: no disk: {exc}")
                continue
            if exp is None:
                notes.append(f"{e.key}: no snapshot of {e.image} to boot: no disk on its command line")
            else:
                out[e.key] = exp.cmdline
        return out

    def _current_nbd_args(self, plan: BootPlan, server: str, notes: list[str]) -> dict[str, str]:
        """The exports the host's current boot has (no I/O, nothing made)."""
        cfg: Config = self.ctx.config
        disks = self.ctx.disks
        mac = plan.settings.mac
        if not cfg.nbd.enabled or not plan.entries:
            return {}
        if disks is None:
            token = fallback_token(self.ctx.store, mac)
            return {e.key: f"bootd.nbd={_url_host(server)}:{cfg.nbd.port}/{token}" for e in plan.entries}
        out = {}
        for e in plan.entries:
            exp = disks.export_for(mac, e.snapshot_id) if e.snapshot_id is not None else None
            if exp is None and e.key == plan.default:
                exp = disks.export_for(mac)
            if exp is not None:
                out[e.key] = exp.cmdline
        if len(out) < len(plan.entries):
            notes.append("preview: disk exports are made when the PC fetches its menu; entries without "
                         "one show no bootd.nbd")
        return out

    def _cmdline(self, host: BootHost, e: CatalogEntry, server: str, http_base: str,
                 nbd: Optional[str], sid: Optional[int]) -> str:
        cfg: Config = self.ctx.config
        # kernel arguments global -> image -> group -> host (the plan's settings), then bootd's own
        parts = [cfg.menu.cmdline, e.cmdline, host.cmdline, f"bootd.server={server}"]
        if nbd:
            parts.append(nbd)
            if e.native:
                parts.append(stock_nbd_root(nbd))
        if host.mac:
            parts.append(f"bootd.config={http_base}/clients/{host.mac}/")
        parts.append(f"bootd.image={e.image}")
        if sid is not None:
            parts.append(f"bootd.snapshot={sid}")
        nfs = _nfs_cmdline(self.ctx, host)
        if nfs:
            parts.append(nfs)
        return " ".join(p.strip() for p in parts if p and p.strip())


def stock_nbd_root(nbd: str) -> str:
    """The words a stock initramfs mounts its root over NBD with (Debian's nbd-client hook,
    /usr/share/initramfs-tools/scripts/local-top/nbd: `nbdroot=HOST:PORT/NAME`, the device from
    `root=/dev/nbd0`, the network from `ip=dhcp`), for the export `bootd.nbd=HOST:PORT/NAME` names."""
    return f"root=/dev/nbd0 nbdroot={nbd.removeprefix('bootd.nbd=')} ip=dhcp"


def _nfs_cmdline(ctx: Context, host: BootHost) -> str:
    """The client root's NFS arguments (empty when no client root is configured)."""
    if not host.mac:
        return ""
    try:
        return nfs_cmdline_for(ctx.config, host.mac)
    except Exception as exc:
        log.warning("nfs cmdline for %s: %s", host.mac, exc, extra={"mac": host.mac})
        return ""


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


