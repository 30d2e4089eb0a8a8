"""What a host may boot: the catalog seam between the menus and wherever OS images come from.

A `Catalog` answers `entries_for(host)` with the entries of that host's menu, in menu order. The
renderers never see where an entry came from: `ConfigCatalog` reads the config's `images` list (no
snapshots), the snapshot store's `SnapshotCatalog` (snapshots/catalog.py) adds current, previous and
pinned snapshots. Both return the same `CatalogEntry`, so a new source needs no renderer change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

from bootd.config import Config, normalize_mac

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class BootHost:
    """A PC as the catalog sees it: its identity and its effective (host over group) settings."""

    mac: str
    name: Optional[str]
    group: Optional[str]
    images: tuple[str, ...]
    default_image: Optional[str]
    boot: str  # "ipxe" | "pxelinux" | "grub"
    persistent: bool


@dataclass(frozen=True)
class CatalogEntry:
    """One bootable choice. `cmdline` holds the image's own arguments; bootd's are added by the Booter."""

    key: str
    image: str
    title: str
    kernel: str  # relative to the boot root
    initrd: str  # relative to the boot root
    cmdline: str = ""
    snapshot_id: Optional[int] = None
    version: Optional[str] = None
    default: bool = False
    previous: bool = False

    def __post_init__(self) -> None:
        if not _KEY_RE.match(self.key):
            raise ValueError(f"catalog entry key {self.key!r}: use lower-case letters, digits, '_' and '-'")


@runtime_checkable
class Catalog(Protocol):
    def entries_for(self, host: BootHost) -> list[CatalogEntry]: ...


def entry_key(*parts: object) -> str:
    """A menu key from free text: 'Debian', 'v3' -> 'debian-v3' (safe in iPXE, pxelinux and GRUB)."""
    raw = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    key = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")
    return (key or "entry")[:63]


def boot_host(config: Config, mac: str) -> BootHost:
    """The effective settings of `mac`: host entry over its group over defaults (unknown PCs included)."""
    mac = normalize_mac(mac)
    host = config.host_by_mac(mac)
    group = config.group(host.group) if host and host.group else None
    if host is not None and host.images is not None:
        images = list(host.images)
    elif group is not None:
        images = list(group.images)
    else:
        images = [i.name for i in config.images]
    default = (host.default_image if host and host.default_image else None) or \
              (group.default_image if group else None)
    if default not in images:
        default = images[0] if images else None
    boot = (host.boot if host and host.boot else None) or (group.boot if group else "ipxe")
    persistent = host.persistent if host and host.persistent is not None else bool(group and group.persistent)
    return BootHost(mac=mac, name=host.name if host else None, group=group.name if group else None,
                    images=tuple(images), default_image=default, boot=boot, persistent=persistent)


class ConfigCatalog:
    """The catalog before any snapshot exists: one entry per image of the host, from the config."""

    def __init__(self, config: Config):
        self.config = config

    def entries_for(self, host: BootHost) -> list[CatalogEntry]:
        out = []
        for name in host.images:
            image = self.config.image(name)
            if image is None:
                continue
            out.append(CatalogEntry(key=entry_key(name), image=name, title=image.title or name,
                                    kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline,
                                    default=(name == host.default_image)))
        return out
