"""DiskAdmin: what an admin does to a host's disk - throw its changes away (`bootctl disk reset`) or
turn a persistent host's layer into a draft of its image (`bootctl disk commit`)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from nbdexport.errors import DiskError
from nbdexport.exports import ExportSet
from nbdexport.model import ExportRow, norm_mac
from nbdexport.reaper import Reaper


class DiskAdmin:
    def __init__(self, exports: ExportSet, reaper: Reaper, snapshot_store: Callable[[], Any]):
        self.exports = exports
        self.reaper = reaper
        self.snapshot_store = snapshot_store

    def _refuse_drafts(self, mac: str, drafts: list[ExportRow]) -> None:
        """A maintenance host's disk is the draft itself (the snapshot store's file): a reset would throw
        the admin's work away, so it refuses and names the commands that do what is meant."""
        host = self.exports.host_name(mac) or mac
        names = ", ".join(sorted({r.snap.name for r in drafts}))
        first = drafts[0].snap.name
        image = first.split("@", 1)[0]
        raise DiskError(f"{host} is in maintenance: its disk is draft {names}, which disk reset never removes. "
                        f"Keep the changes: bootctl snapshot seal {first} --note NOTE; throw them away: "
                        f"bootctl snapshot delete {first}; stop booting the draft: "
                        f"bootctl snapshot end-maintenance {image} {host}", status=409)

    def _outside_disks(self, path: str) -> bool:
        """A layer path that is not in the disk directory's persistent/ folder (never a snapshot's file)."""
        folder = (self.exports.overlays.dir / "persistent").resolve()
        return Path(path).resolve().parent != folder

    async def reset(self, mac: str, dry_run: bool = False) -> dict[str, Any]:
        """Throw away the host's disk changes: its persistent layer and its running exports' overlays.
        Never a draft or any other snapshot layer (refused, with the command that fits). `dry_run`: only
        the plan, what would be removed."""
        ex = self.exports
        mac = norm_mac(mac)
        async with ex.mac_lock(mac):
            rows = ex.of_mac(mac)
            layer = ex.tables.layer(mac)
            if not rows and layer is None:
                raise DiskError(f"{mac} has no disk", status=404)
            drafts = [r for r in rows if r.is_draft]
            if drafts:
                self._refuse_drafts(mac, drafts)
            if layer is not None and self._outside_disks(layer["path"]):
                raise DiskError(f"{mac}'s persistent layer {layer['path']} is outside the disk directory: "
                                f"not removed (run bootctl snapshot fsck if it is a snapshot's file)", status=409)
            plan = [f"export of boot {r.boot} over {r.snap.name}"
                    + ("" if r.persistent else f" and its overlay {Path(r.overlay).name}") for r in rows]
            if layer is not None:
                plan.append(f"persistent layer {Path(layer['path']).name} over {layer['snapshot_name']} "
                            f"(every change the host made)")
            if dry_run:
                return {"mac": mac, "dry_run": True, "would_remove": plan}
            # files first, rows after: on a full filesystem the state store can only write once the
            # overlay's space is back (a row whose file is gone is dropped at the next start)
            for r in rows:
                del ex.rows[r.name]
                await ex.teardown(r, delete_file=r.has_overlay)
            if layer is not None:
                ex.overlays.remove(layer["path"])
            ex.tables.drop_exports([r.name for r in rows], layer_of=mac)
        ex.store.record_event(mac, "disk", {"action": "reset"})
        return {"mac": mac, "dry_run": False, "removed": plan, "exports_removed": len(rows),
                "layer_removed": layer is not None}

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
            if self._outside_disks(layer["path"]):
                raise DiskError(f"{mac}'s persistent layer {layer['path']} is outside the disk directory: "
                                f"not committed (run bootctl snapshot fsck)", status=409)
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
