"""DiskAdmin: what an admin does to a host's disk - throw its changes away (`bootctl disk reset`) or
turn a persistent host's layer into a draft of its image (`bootctl disk commit`)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from nbdexport.errors import DiskError
from nbdexport.exports import ExportSet
from nbdexport.model import norm_mac
from nbdexport.reaper import Reaper


class DiskAdmin:
    def __init__(self, exports: ExportSet, reaper: Reaper, snapshot_store: Callable[[], Any]):
        self.exports = exports
        self.reaper = reaper
        self.snapshot_store = snapshot_store

    async def reset(self, mac: str) -> dict[str, Any]:
        """Throw away the host's disk changes: its persistent layer (and any running export of it)."""
        ex = self.exports
        mac = norm_mac(mac)
        async with ex.mac_lock(mac):
            rows = ex.of_mac(mac)
            layer = ex.tables.layer(mac)
            if not rows and layer is None:
                raise DiskError(f"{mac} has no disk", status=404)
            # files first, rows after: on a full filesystem the state store can only write once the
            # overlay's space is back (a row whose file is gone is dropped at the next start)
            for r in rows:
                del ex.rows[r.name]
                await ex.teardown(r, delete_file=r.has_overlay)  # never a draft's own file
            if layer is not None:
                ex.overlays.remove(layer["path"])
            ex.tables.drop_exports([r.name for r in rows], layer_of=mac)
        ex.store.record_event(mac, "disk", {"action": "reset"})
        return {"mac": mac, "exports_removed": len(rows), "layer_removed": layer is not None}

    async def commit(self, mac: str, note: str = "", force: bool = False) -> dict[str, Any]:
        """Turn a persistent host's layer into a draft of its image (via the snapshot store): the store
        makes an empty draft over the layer's snapshot, the layer is re-pointed at that draft (same
        content, so an unsafe rebase is exact) and committed into it. The host starts clean next boot."""
        ex = self.exports
        mac = norm_mac(mac)
        snapshots = self.snapshot_store()
        if snapshots is None:
            raise DiskError("no snapshot store: commit needs one", status=501)
        async with ex.mac_lock(mac):
            layer = ex.tables.layer(mac)
            if layer is None:
                raise DiskError(f"{mac} has no persistent layer to commit", status=404)
            if layer["snapshot_id"] is None:
                raise DiskError("this layer is over a bare file, not a snapshot of the store", status=409)
            rows = [r for r in ex.of_mac(mac) if r.overlay == layer["path"]]
            if rows and self.reaper.connected(mac) and not force:
                raise DiskError(f"{mac} is connected to this disk; shut it down first (or --force)", status=409)
            for r in rows:
                ex.forget(r)
                await ex.teardown(r, delete_file=False)
            draft = await asyncio.to_thread(snapshots.draft_from_layer, layer["snapshot_id"], layer["path"], note)
            ex.tables.drop_layer(mac)
            ex.overlays.remove(layer["path"])
        ex.store.record_event(mac, "disk", {"action": "commit", "draft": draft.name})
        return {"mac": mac, "draft": draft.name, "draft_id": draft.id}
