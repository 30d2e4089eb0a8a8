"""Checks of the setup at start and on every reload, shown as warnings (log, `bootctl status`):
a kernel or initrd an image names that is not in the boot root (every PC choosing that image would
fail at that step), a Secure Boot room whose signed shim or GRUB is not there (Debian's packages
missing), GRUB rooms behind proxyDHCP (they need the site's DHCP to name bootd as next-server), and
another DHCP server answering on a served interface (bootd/dhcp/rogue.py).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bootd.config import Config
from bootd.dhcp import rogue
from bootd.service import Service

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.checks")


def missing_boot_files(config: Config) -> list[str]:
    """One line per kernel/initrd an image names that is not a file in the boot root (TFTP), or in
    the HTTP boot root when that is another directory."""
    roots = [("TFTP", config.boot_root)] if config.tftp.enabled else []
    if config.http_root != config.boot_root or not roots:
        roots.append(("HTTP", config.http_root))
    out = []
    for image in config.images:
        for step, name in (("kernel", image.kernel), ("initrd", image.initrd)):
            for proto, root in roots:
                if not (Path(root) / name.lstrip("/")).is_file():
                    out.append(f"image {image.name}: {step} {name} is missing from {root} ({proto} boot root)")
    return list(dict.fromkeys(out))


def missing_secureboot_loaders(config: Config) -> list[str]:
    """One line per signed loader a `secureboot: true` room (or PC) needs that is not in the boot root:
    its UEFI PCs would get "file not found" right after DHCP."""
    rooms = [f"group {g.name}" for g in config.groups if g.secureboot]
    rooms += [f"host {h.name}" for h in config.hosts if h.secureboot]
    if not rooms:
        return []
    loaders = config.dhcp.loaders
    out = []
    for rel, package in ((loaders.shim_x64, "shim-signed"), (loaders.secureboot_grub, "grub-efi-amd64-signed")):
        if not (config.boot_root / rel).is_file():
            out.append(f"{', '.join(rooms)} (secureboot: true): {rel} is missing from {config.boot_root}: "
                       f"apt install {package} (bootd copies it at start), or put a signed one there")
    return out


def proxy_grub_rooms(config: Config) -> list[str]:
    """In proxy mode, GRUB (Debian 12's 2.06, signed or not) takes its TFTP server from the site server's
    DHCP ACK, not from bootd's proxy offer: its rooms boot only if the site's DHCP names bootd as the
    next server (siaddr), else GRUB stops at its prompt after loading."""
    if config.dhcp.mode != "proxy":
        return []
    rooms = [f"group {g.name}" for g in config.groups if g.boot == "grub"]
    rooms += [f"host {h.name}" for h in config.hosts if h.boot == "grub" or h.secureboot]
    if not rooms:
        return []
    server = config.server_ip or "bootd's address"
    return [f"{', '.join(rooms)}: PCs booting GRUB in proxy mode: the site's DHCP server must give these "
            f"PCs {server} as next-server (siaddr; dnsmasq dhcp-boot=,,{server}, ISC/kea next-server), "
            f"because GRUB takes its server from that server's answer, not from bootd's proxy offer "
            f"(README, Secure Boot)"]


class SetupChecks(Service):
    """Runs the checks at start and reload; the other-DHCP probe runs in the background (it listens
    for ~2 s), so neither start-up nor a reload waits for it."""

    name = "checks"

    def __init__(self) -> None:
        self.file_warnings: list[str] = []
        self.dhcp_warnings: list[str] = []
        self.dhcp_checked: Optional[str] = None  # why the last probe did not run, or "done"
        self._probe: Optional[asyncio.Task[None]] = None

    async def start(self, ctx: "Context") -> None:
        self._check(ctx.config)

    async def reload(self, ctx: "Context") -> None:
        self._check(ctx.config)

    async def stop(self) -> None:
        task, self._probe = self._probe, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _check(self, config: Config) -> None:
        self.file_warnings = missing_boot_files(config) + missing_secureboot_loaders(config) + \
            proxy_grub_rooms(config)
        for w in self.file_warnings:
            log.warning("%s", w)
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        interfaces = {i.name: str(i.address.ip) for i in config.interfaces}
        if config.dhcp.mode != "full" or not config.dhcp.detect_other_servers or not interfaces:
            self.dhcp_warnings = []
            self.dhcp_checked = "off (dhcp.mode is not full, or dhcp.detect_other_servers is false)"
            return
        self.dhcp_checked = "running"
        self._probe = asyncio.get_running_loop().create_task(self._look_for_dhcp(interfaces),
                                                             name="bootd-other-dhcp")

    async def _look_for_dhcp(self, interfaces: dict[str, str]) -> None:
        try:
            others, problems = await rogue.probe_all(interfaces)
        except Exception as e:  # a bug here must not pass silently, nor stop anything else
            log.error("cannot look for other DHCP servers: %s", e)
            self.dhcp_checked = f"failed: {e}"
            return
        for p in problems:
            log.info("%s", p)
        self.dhcp_warnings = [str(o) for o in others]
        for w in self.dhcp_warnings:
            log.warning("%s: PCs may take its offer and never boot from bootd", w)
        self.dhcp_checked = "done"

    def status(self) -> dict:
        return {"missing_files": len(self.file_warnings), "other_dhcp_servers": len(self.dhcp_warnings),
                "other_dhcp_check": self.dhcp_checked}

    def warning(self) -> Optional[str]:
        warnings = self.file_warnings + self.dhcp_warnings
        return "; ".join(warnings) if warnings else None
