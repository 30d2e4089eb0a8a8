"""What a host may boot: the catalog seam between the menus and wherever OS images come from.

The boot decision itself is bootd/bootplan.py (`plan_for`): its entries are the host's menu. A `Catalog`
is the seam for another source of entries (`entries_for(host)`, in menu order); the Booter turns them
into a plan with the same rules (order, default, disks), so the renderers never see where an entry came
from. `ConfigCatalog` is the config's images with no snapshots.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from bootd.bootplan import HostSettings, MenuEntry, entry_key, host_settings, image_entries
from bootd.config import Config

# The names the menus have always used for the boot plan's types.
BootHost = HostSettings
CatalogEntry = MenuEntry
boot_host = host_settings

__all__ = ["BootHost", "Catalog", "CatalogEntry", "ConfigCatalog", "boot_host", "entry_key"]


@runtime_checkable
class Catalog(Protocol):
    def entries_for(self, host: BootHost) -> list[CatalogEntry]: ...


class ConfigCatalog:
    """The catalog before any snapshot exists: one entry per image of the host, from the config."""

    def __init__(self, config: Config):
        self.config = config

    def entries_for(self, host: BootHost) -> list[CatalogEntry]:
        return image_entries(self.config, None, host)
