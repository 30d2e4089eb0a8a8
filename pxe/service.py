"""The menus service: sets `ctx.booter` and answers per-host menu files over TFTP.

Menus are rendered when a PC asks (TFTP provider seam, bootd/tftp/server.py), never written to disk,
so a snapshot promotion or a config reload shows in the very next boot without regenerating a tree.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional

from bootd.macaddr import MAC_PATTERN, parse_mac
from bootd.peers import may_act_for, refuse
from bootd.service import Service
from pxe.booter import Booter, render, server_for

log = logging.getLogger("bootd.pxe")

_MAC = MAC_PATTERN
PXELINUX_RE = re.compile(rf"pxelinux\.cfg/(?:01-(?P<mac>{_MAC})|default)", re.I)
GRUB_RE = re.compile(rf"(?:boot/)?grub/grub\.cfg(?:-(?:01-)?(?P<mac>{_MAC}))?", re.I)
IPXE_RE = re.compile(rf"(?:boot/)?(?P<mac>{_MAC})\.ipxe", re.I)


class MenuProvider:
    """A TFTP provider rendering one flavour for the MAC in the name (or the asking client's MAC)."""

    def __init__(self, ctx: Any, flavour: str, pattern: re.Pattern):
        self.ctx = ctx
        self.flavour = flavour
        self.pattern = pattern

    async def __call__(self, path: str, client_ip: str, client_mac: Optional[str]) -> Optional[bytes]:
        m = self.pattern.fullmatch(path)
        if m is None:
            return None
        mac = parse_mac(m.group("mac")) if m.group("mac") else client_mac
        if mac and not may_act_for(self.ctx, client_ip, mac):
            refuse(self.ctx, "tftp", client_ip, mac, f"{self.flavour} menu")
            return None
        booter = self.ctx.booter or Booter(self.ctx)
        menu = await booter.menu_for(mac, server_for(self.ctx.config, client_ip))
        if mac:
            self.ctx.store.touch_host(mac, ip=client_ip)
        log.info("tftp %s menu for %s (default %s)", self.flavour, mac or client_ip, menu.default,
                 extra={"mac": mac})
        return render(menu, self.flavour).encode()


class MenuService(Service):
    name = "menus"

    def __init__(self) -> None:
        self.providers: list[MenuProvider] = []
        self.tftp = None

    async def start(self, ctx) -> None:
        ctx.booter = Booter(ctx)
        self.tftp = ctx.tftp
        if self.tftp is None:
            log.info("menus: no TFTP server: pxelinux and GRUB menus only through HTTP")
            return
        for flavour, pattern in (("pxelinux", PXELINUX_RE), ("grub", GRUB_RE), ("ipxe", IPXE_RE)):
            p = MenuProvider(ctx, flavour, pattern)
            self.tftp.add_provider(p, pattern)
            self.providers.append(p)

    async def stop(self) -> None:
        if self.tftp is not None:
            for p in self.providers:
                self.tftp.remove_provider(p)
        self.providers = []

    async def reload(self, ctx) -> None:
        # Menus read ctx.config at every request; only a new TFTP server needs the providers again.
        if ctx.tftp is not self.tftp:
            await self.stop()
            await self.start(ctx)

    def status(self) -> dict:
        return {"tftp_providers": [p.flavour for p in self.providers]}
