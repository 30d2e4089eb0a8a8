"""What a fetched file name means on a boot timeline: which step of a boot (loader, menu, kernel ...),
which boot program (shim, grub, ipxe, pxelinux), and which names boot programs only probe for.

Read by the TFTP and HTTP servers when they record a fetch, and by bootd/hoststate.py for a PC's loader
chain; names only, no I/O.
"""
from __future__ import annotations

import re

__all__ = ["OPTIONAL_NAMES", "event_kind", "is_optional", "program_of"]


def event_kind(path: str, dynamic: bool = False) -> str:
    """Which step of a boot a fetched name is, for the boot timeline."""
    name = path.lower()
    base = name.rsplit("/", 1)[-1]
    if name.startswith("clients/"):
        return "config"  # rendered client configs (bootd/clientconfig)
    if (dynamic or name.startswith("pxelinux.cfg/") or base.endswith((".cfg", ".ipxe", ".conf", ".menu"))
            or "grub.cfg" in base):
        return "menu"
    if base.endswith((".efi", ".kpxe", ".pxe", ".0", ".c32", ".lkrn", ".com", ".mod")):
        return "loader"
    if base.startswith(("vmlinuz", "bzimage", "linux", "kernel")):
        return "kernel"
    if base.startswith(("initrd", "initramfs", "initram")) or base.endswith((".cpio", ".cpio.gz", ".img")):
        return "initrd"
    return "file"


# Names boot programs ask for and boot fine without: shim's revocation lists and extra certificates
# (shim 15.7+), GRUB's module lists and the per-platform config it tries before grub/grub.cfg, its fonts
# and translations. Their absence is no failed step on a PC's timeline.
OPTIONAL_NAMES = re.compile(
    r"(?:.*/)?(?:revocations_(?:sku|sbat)\.efi|shim_certificate[^/]*\.efi)"
    r"|(?:.*/)?grub/(?:x86_64|i386|arm64)-(?:efi|pc)/(?:[a-z]+\.lst|grub\.cfg)"
    r"|(?:.*/)?grub/(?:fonts|locale)/[^/]+", re.I)

# What a loader file is, for the loader chain on a boot timeline (shim -> grub -> kernel).
_PROGRAMS = (("shim", re.compile(r"shim[a-z0-9]*\.efi", re.I)),
             ("grub", re.compile(r"(?:grub|core)[a-z0-9]*\.efi", re.I)),
             ("ipxe", re.compile(r"(?:ipxe|snponly|undionly|snp)[a-z0-9_-]*\.(?:efi|kpxe|kkpxe|pxe|lkrn)", re.I)),
             ("pxelinux", re.compile(r"(?:l?pxelinux\.0|ldlinux\.c32|syslinux[a-z0-9]*\.efi)", re.I)))


def is_optional(path: str) -> bool:
    return OPTIONAL_NAMES.fullmatch(path.lstrip("/")) is not None


def program_of(path: str) -> str:
    """shim, grub, ipxe, pxelinux, or "loader" for a boot program bootd does not know by name."""
    base = path.rsplit("/", 1)[-1]
    for name, rx in _PROGRAMS:
        if rx.fullmatch(base):
            return name
    return "loader"


