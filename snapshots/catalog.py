"""SnapshotCatalog: the menu seam's view of the snapshot store.

For each image a host may boot (pxe.catalog.BootHost.images) the menu gets one entry for the snapshot
the host boots now (maintenance draft > pin > test > its group's current > all groups' current) and,
when there is one, a "previous" entry: what a rollback would bring back, or for a pinned/testing host
what its group boots. The store is read on every call, so a promote or rollback changes the next menu
without restarting anything. Kernel, initrd and cmdline come from the config's `images` entry.
"""
from __future__ import annotations

from pxe.catalog import BootHost, CatalogEntry, entry_key

from .model import ALL_GROUPS
from .store import SnapshotStore


def _label(snap) -> str:
    return f"v{snap.version}" if snap.version is not None else f"draft-{snap.id}"


class SnapshotCatalog:
    def __init__(self, store: SnapshotStore, config):
        self.store = store
        self.config = config

    def _normal(self, host: BootHost, image: str):
        """What the host's group boots (ignoring pins and tests): (snapshot, group key it came from)."""
        img = self.store._image_row(image)
        if host.group:
            snap = self.store._active(img["id"], "current", host.group)
            if snap is not None:
                return snap, host.group
        return self.store._active(img["id"], "current", ALL_GROUPS), ALL_GROUPS

    def entries_for(self, host: BootHost) -> list[CatalogEntry]:
        known = {r["name"] for r in self.store.state.query("SELECT name FROM images")}
        out: list[CatalogEntry] = []
        for name in host.images:
            image = self.config.image(name)
            if image is None:
                continue
            title = image.title or name
            base = dict(image=name, kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline)
            snap, why = (self.store.boot_choice(host.mac, host.group, name) if name in known and host.mac
                         else (None, ""))
            if snap is None:  # nothing promoted (or not in the store): the kernel boots without a disk
                out.append(CatalogEntry(key=entry_key(name), title=title, default=(name == host.default_image),
                                        **base))
                continue
            tag = {"pinned": ", pinned", "test": ", test", "maintenance": ", maintenance (writable)"}.get(why, "")
            out.append(CatalogEntry(key=entry_key(name), title=f"{title} ({_label(snap)}{tag})",
                                    snapshot_id=snap.id, version=snap.name,
                                    default=(name == host.default_image), **base))
            prev = None
            if why in ("pinned", "test", "maintenance"):
                normal, _ = self._normal(host, name)
                prev = normal if normal is not None and normal.id != snap.id else None
            else:
                group = host.group if why.startswith("group ") else ALL_GROUPS
                prev = self.store.previous_for(group, name)
                if prev is not None and prev.id == snap.id:
                    prev = None
            if prev is not None:
                out.append(CatalogEntry(key=entry_key(name, "prev"), title=f"{title} (previous: {_label(prev)})",
                                        snapshot_id=prev.id, version=prev.name, previous=True, **base))
        return out
