"""SnapshotCatalog: the menu seam's view of the snapshot store.

The entries (one per image: the snapshot the host boots now, and a "previous" entry) are the boot
plan's (bootd.bootplan.image_entries); this adapter offers them where a `pxe.catalog.Catalog` is wanted.
The store is read on every call, so a promote or rollback changes the next menu.
"""
from __future__ import annotations

from bootd.bootplan import image_entries
from bootd.config import Config
from pxe.catalog import BootHost, CatalogEntry

from .store import SnapshotStore


class SnapshotCatalog:
    def __init__(self, store: SnapshotStore, config: Config):
        self.store = store
        self.config = config

    def entries_for(self, host: BootHost) -> list[CatalogEntry]:
        return image_entries(self.config, self.store, host)
