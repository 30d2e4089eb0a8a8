"""The menus service: sets `ctx.booter` and answers per-host menu files over TFTP.

Menus are rendered when a PC asks (TFTP provider seam, bootd/tftp/server.py), never written to disk,
so a snapshot promotion or a config reload shows in the very next boot without regenerating a tree.
"""
from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from bootd.macaddr import MAC_PATTERN, parse_mac
from bootd.peers import may_act_for, refuse
from bootd.seams import TftpFiles
from bootd.service import Service
from pxe.booter import Booter, render, server_for

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.pxe")

_MAC = MAC_PATTERN
PXELINUX_RE = re.compile(rf"pxelinux\.cfg/(?:01-(?P<mac>{_MAC})|default)", re.I)
GRUB_RE = re.compile(rf"(?:boot/)?grub/grub\.cfg(?:-(?:01-)?(?P<mac>{_MAC}))?", re.I)
IPXE_RE = re.compile(rf"(?:boot/)?(?P<mac>{_MAC})\.ipxe", re.I)
# what pxelinux fetches at every power-on before it reads its menu: the loader, then its core module
PXELINUX_CHAIN_RE = re.compile(r"(?:.*/)?(?:l?pxelinux\.0|ldlinux\.c32)", re.I)


class PxelinuxReads:
    """Which pxelinux menu reads start a boot. pxelinux reads its menu file twice per power-on
    (ldlinux.c32, then the UI module, menu.c32): the second read must get the same disks, not a second
    boot with new overlays. A read starts a boot unless the same MAC read its menu less than `window`
    seconds ago and has not fetched pxelinux.0 or ldlinux.c32 since (which only a new power-on does)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._last_read: dict[str, float] = {}  # MAC -> when its menu was last read in the current chain

    def loader_fetched(self, mac: str) -> None:
        """`mac` fetched pxelinux.0 or ldlinux.c32: a new power-on, its next menu read is a new boot."""
        self._last_read.pop(mac, None)

    def starts_boot(self, mac: str, window: float) -> bool:
        now = self.clock()
        for old in [m for m, t in self._last_read.items() if now - t > window]:
            del self._last_read[old]  # forget PCs done reading (bounded by the PCs that may fetch a menu)
        same_power_on = mac in self._last_read
        self._last_read[mac] = now
        return not same_power_on


class MenuProvider:
    """A TFTP provider rendering one flavour for the MAC in the name (or the asking client's MAC)."""

    def __init__(self, ctx: Any, flavour: str, pattern: re.Pattern[str], reads: Optional[PxelinuxReads] = None):
        self.ctx = ctx
        self.flavour = flavour
        self.pattern = pattern
        self.reads = reads  # pxelinux: whether a read starts a boot or repeats the current one

    async def __call__(self, path: str, client_ip: str, client_mac: Optional[str]) -> Optional[bytes]:
        m = self.pattern.fullmatch(path)
        if m is None:
            return None
        mac = parse_mac(m.group("mac")) if m.group("mac") else client_mac
        if mac and not may_act_for(self.ctx, client_ip, mac):
            refuse(self.ctx, "tftp", client_ip, mac, f"{self.flavour} menu")
            return None
        booter = self.ctx.booter or Booter(self.ctx)
        new_boot = True
        if mac and self.reads is not None:
            new_boot = self.reads.starts_boot(mac, self.ctx.config.menu.pxelinux_reread_window)
        menu = await booter.menu_for(mac, server_for(self.ctx.config, client_ip), new_boot=new_boot)
        if mac:
            self.ctx.store.touch_host(mac, ip=client_ip)
        log.info("tftp %s menu for %s (default %s%s)", self.flavour, mac or client_ip, menu.default,
                 "" if new_boot else ", re-read in the same boot", extra={"mac": mac})
        return render(menu, self.flavour).encode()


class LoaderWatch:
    """A TFTP provider that serves nothing: it notes which PC fetched pxelinux.0 or ldlinux.c32 (a new
    power-on) and lets the file come from the boot root."""

    def __init__(self, reads: PxelinuxReads):
        self.reads = reads

    def __call__(self, path: str, client_ip: str, client_mac: Optional[str]) -> None:
        if client_mac:
            self.reads.loader_fetched(client_mac)
        return None


class MenuService(Service):
    name = "menus"

    def __init__(self) -> None:
        self.providers: list[MenuProvider] = []
        self.pxelinux_reads = PxelinuxReads()
        self.loader_watch = LoaderWatch(self.pxelinux_reads)
        self.tftp: Optional[TftpFiles] = None

    async def start(self, ctx: Context) -> None:
        ctx.booter = Booter(ctx)
        self.tftp = ctx.tftp
        if self.tftp is None:
            log.info("menus: no TFTP server: pxelinux and GRUB menus only through HTTP")
            return
        self.tftp.add_provider(self.loader_watch, PXELINUX_CHAIN_RE)
        for flavour, pattern in (("pxelinux", PXELINUX_RE), ("grub", GRUB_RE), ("ipxe", IPXE_RE)):
            p = MenuProvider(ctx, flavour, pattern, self.pxelinux_reads if flavour == "pxelinux" else None)
            self.tftp.add_provider(p, pattern)
            self.providers.append(p)

    async def stop(self) -> None:
        if self.tftp is not None:
            for p in self.providers:
                self.tftp.remove_provider(p)
            self.tftp.remove_provider(self.loader_watch)
        self.providers = []

    async def reload(self, ctx: Context) -> None:
        # Menus read ctx.config at every request; only a new TFTP server needs the providers again.
        if ctx.tftp is not self.tftp:
            await self.stop()
            await self.start(ctx)

    def status(self) -> dict[str, object]:
        return {"tftp_providers": [p.flavour for p in self.providers]}
