"""Which boot program a PC gets, decided from what its firmware says about itself.

Option 93 names the architecture (RFC 4578 + IANA registry): 0 BIOS, 6 UEFI ia32, 7 UEFI x86-64,
9 is what many real x86-64 UEFI ROMs send instead of 7, 11 UEFI ARM64, 16 UEFI x86-64 HTTP boot.
A client that is already iPXE gets its per-host script URL, never the iPXE binary again (that would
be a boot loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bootd.config import LoaderConfig
from bootd.dhcp.codec import DhcpMessage

ARCH_NAMES = {0: "bios", 6: "uefi-ia32", 7: "uefi-x64", 9: "uefi-x64", 10: "uefi-arm32", 11: "uefi-arm64",
              15: "uefi-ia32-http", 16: "uefi-x64-http", 19: "uefi-arm64-http"}
HTTP_ARCHES = {15, 16, 19}


@dataclass(frozen=True, slots=True)
class Firmware:
    """What a DHCP client is, as far as booting goes."""

    arch: str  # bios, uefi-x64, ... or "unknown"
    arch_code: Optional[int]
    pxe: bool  # sent option 60 PXEClient
    http: bool  # UEFI HTTP boot (option 60 HTTPClient or an HTTP arch)
    ipxe: bool  # already running iPXE

    @property
    def boots(self) -> bool:
        return self.pxe or self.http or self.ipxe


_PLAIN = Firmware(arch="unknown", arch_code=None, pxe=False, http=False, ipxe=False)


def identify(msg: DhcpMessage) -> Firmware:
    o = msg.options
    if 60 not in o and 93 not in o and 77 not in o and 175 not in o:
        return _PLAIN  # an ordinary DHCP client: the common case, decided without parsing
    arches = msg.client_arch
    code = arches[0] if arches else None
    http = msg.is_http_client or (code in HTTP_ARCHES)
    if code is None:
        arch = "bios" if (msg.is_pxe or msg.is_http_client) else "unknown"
    else:
        arch = ARCH_NAMES.get(code, f"arch-{code}")
    return Firmware(arch=arch, arch_code=code, pxe=msg.is_pxe, http=http, ipxe=msg.is_ipxe)


def loader_for(fw: Firmware, loaders: LoaderConfig, boot: str = "ipxe", secureboot: bool = False) -> Optional[str]:
    """The boot program file for this firmware (a path in the boot root), or None if none fits.

    `boot` is the host's or group's choice: ipxe (default), pxelinux (BIOS) or grub (UEFI x86-64);
    `secureboot`: a UEFI x86-64 PC gets Debian's signed shim, which loads the signed GRUB beside it.
    A UEFI HTTP boot client of a grub (or Secure Boot) room gets the same chain over HTTP."""
    a = fw.arch
    if a == "bios":
        return loaders.pxelinux if boot == "pxelinux" else loaders.bios
    if a in ("uefi-x64", "uefi-x64-http"):
        if secureboot:
            return loaders.shim_x64
        if boot == "grub":
            return loaders.grub_x64
        return loaders.uefi_x64 if a == "uefi-x64" else loaders.uefi_http
    if a == "uefi-ia32":
        return loaders.uefi_ia32
    if a == "uefi-arm64":
        return loaders.uefi_arm64
    if a in ("uefi-ia32-http", "uefi-arm64-http"):
        return loaders.uefi_http
    return None
