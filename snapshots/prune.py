"""Removing from the snapshot store: deleting a snapshot, pruning old ones nothing uses, and flattening a
layer into a standalone file (which frees the layers it read through for a later prune).

A delete marks the row "deleting" before unlinking and "deleted" after (fsck finishes an interrupted
one); a flatten renames a standalone copy over the layer (same content) before the row drops its backing.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from bootd.units import human

from . import qemu
from .bootfiles import BootFileStore
from .crash import crash_point
from .errors import Refused, SnapshotError
from .files import LayerFiles, allocated, unlink_quiet
from .hooks import StoreHooks
from .lifecycle import record_audit
from .model import ALL_GROUPS, Snapshot
from .queries import SnapshotQueries, fetch_one


class SnapshotPruner:
    """Deletes, prunes and flattens; refuses while anything (an assignment, a child layer, an open
    export, a running flatten) still needs the snapshot."""

    def __init__(self, queries: SnapshotQueries, files: LayerFiles, hooks: StoreHooks):
        self.queries = queries
        self.state = queries.state
        self.files = files
        self.hooks = hooks
        self.boot_files: BootFileStore | None = None  # a native snapshot's kernel goes with it

    def delete(self, ref: str | int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]:
        """Delete one snapshot or draft; refused with the reasons while anything uses it. `dry_run`: the
        same checks, and what would go (bootctl lists it before it asks for --yes)."""
        snap = self.queries.resolve(ref)
        if snap.state in ("deleted",):
            raise Refused(f"{snap.name} is already deleted")
        reasons = self.queries.usage(snap)
        if reasons:
            raise Refused(f"cannot delete {snap.name}: " + "; ".join(reasons))
        if dry_run:
            what = "draft" if snap.state == "draft" else "snapshot"
            boot = f" and its kernel {snap.kernel_release}" if snap.kernel_release else ""
            return {"dry_run": True, "would_delete": [f"{what} {snap.name} and its file {snap.path}{boot}"]}
        self._delete_one(snap, actor, reason, "delete")
        return {"deleted": [snap.name]}

    def _delete_one(self, snap: Snapshot, actor: str, reason: str, action: str) -> None:
        with self.state.transaction() as cur:
            row = fetch_one(cur, "SELECT state FROM snapshots WHERE id = ?", (snap.id,))
            if row["state"] not in ("draft", "sealed", "deleting"):
                raise Refused(f"{snap.name} is {row['state']}")
            busy = cur.execute("SELECT kind, target FROM assignments WHERE snapshot_id = ? AND status = 'active'",
                               (snap.id,)).fetchall()
            children = cur.execute("SELECT 1 FROM snapshots WHERE backing_id = ? AND state IN "
                                   "('draft','sealed','deleting')", (snap.id,)).fetchall()
            if busy or children:
                raise Refused(f"cannot delete {snap.name}: it came into use meanwhile")
            cur.execute("UPDATE snapshots SET state = 'deleting' WHERE id = ?", (snap.id,))
            record_audit(cur, actor, action, snap.image, snap.id, None, reason, {"name": snap.name})
        crash_point("prune.marked")
        self.finish_delete(snap.id, snap.path)

    def finish_delete(self, snapshot_id: int, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        qemu.fsync_dir(os.path.dirname(path))
        if self.boot_files is not None:  # layer files live in <root>/<image>/: the image is the directory
            self.boot_files.remove(os.path.basename(os.path.dirname(path)), snapshot_id)
        crash_point("prune.unlinked")
        with self.state.transaction() as cur:
            cur.execute("UPDATE snapshots SET state = 'deleted', deleted_at = ? WHERE id = ? AND state = 'deleting'",
                        (time.time(), snapshot_id))
            # a promotion of a deleted snapshot can no longer be rolled back to
            cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = 'delete' "
                        "WHERE snapshot_id = ? AND status = 'superseded'", (time.time(), snapshot_id))
        crash_point("prune.committed")

    def prune_plan(self, image: str, keep: int) -> tuple[list[Snapshot], dict[str, list[str]]]:
        """(snapshots prune would delete, kept ones with why) — delete children before parents."""
        if keep < 1:
            raise SnapshotError("--keep must be at least 1 (prune never deletes every snapshot)")
        snaps = self.queries.snapshots(image)
        sealed = sorted((s for s in snaps if s.sealed), key=lambda s: s.version or 0)  # sealed: has a version
        by_id = {s.id: s for s in snaps}
        kept: dict[str, list[str]] = {}

        def keep_it(s: Snapshot, why: str) -> None:
            kept.setdefault(s.name, []).append(why)

        protected: set[int] = set()
        for s in sealed[-keep:]:
            keep_it(s, f"one of the {keep} newest")
            protected.add(s.id)
        for s in snaps:
            if s.state != "sealed":
                protected.add(s.id)  # drafts are work in progress; deleting rows are fsck's
                continue
            for why in self.queries.usage(s):
                if not why.startswith("it is the parent"):
                    keep_it(s, why)
                    protected.add(s.id)
        for g in self.queries.current_groups(image):
            prev = self.queries.previous_for(g, image)
            if prev is not None:
                keep_it(by_id.get(prev.id, prev), "the rollback target of " + ("all groups" if g == ALL_GROUPS
                                                                               else f"group {g}"))
                protected.add(prev.id)
        # everything a protected layer reads through stays too
        for sid in list(protected):
            layer = by_id.get(sid)
            while layer is not None and layer.backing_id is not None:
                parent = by_id.get(layer.backing_id)
                if parent is None:
                    break
                if parent.id not in protected:
                    keep_it(parent, f"backing file of {layer.name}")
                    protected.add(parent.id)
                layer = parent
        victims = [s for s in sealed if s.id not in protected]
        # children first: a layer deeper in the chain goes before the one it reads through
        victims.sort(key=lambda s: -s.depth)
        return victims, kept

    def prune(self, image: str, keep: int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]:
        """Delete old snapshots that nothing uses, keeping the `keep` newest sealed ones."""
        victims, kept = self.prune_plan(image, keep)
        crash_point("prune.before")
        deleted = []
        if not dry_run:
            for s in victims:
                self._delete_one(s, actor, reason, "prune")
                deleted.append(s.name)
        return {"image": image, "keep": keep, "dry_run": dry_run,
                "deleted": [s.name for s in victims] if dry_run else deleted, "kept": kept}

    # ------------------------------------------------------------------ flatten
    def flatten(self, ref: str | int, actor: str, reason: str = "",
                progress: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Rewrite a sealed snapshot as a standalone layer (same content, no backing file)."""
        snap = self.queries.resolve(ref)
        if snap.state != "sealed":
            raise Refused(f"cannot flatten {snap.name}: it is {snap.state} (only sealed snapshots are flattened)")
        if snap.backing_id is None:
            raise Refused(f"{snap.name} is already standalone (chain depth 1)")
        with self.files.lock:
            if snap.id in self.files.flattening:
                raise Refused(f"a flatten of {snap.name} is already running")
            self.files.flattening.add(snap.id)
        try:
            need = qemu.measure(snap.path, "qcow2")
            self.files.check_space(need, f"flatten {snap.name} ({human(need)})")
            crash_point("flatten.before")
            tmp, _final, rel = self.files.new_file(snap.image)
            try:
                qemu.convert(snap.path, "qcow2", str(tmp), progress)
                crash_point("flatten.converted")
                os.chmod(tmp, 0o444)
                qemu.fsync_file(str(tmp))
                os.rename(tmp, snap.path)  # same content: clients holding the old file keep reading it
                qemu.fsync_dir(os.path.dirname(snap.path))
            except BaseException:
                unlink_quiet(tmp)
                raise
            finally:
                self.files.release(rel)
            crash_point("flatten.renamed")
            with self.state.transaction() as cur:
                cur.execute("UPDATE snapshots SET backing_id = NULL WHERE id = ?", (snap.id,))
                record_audit(cur, actor, "flatten", snap.image, snap.id, None, reason,
                             {"old_depth": snap.depth, "bytes": allocated(snap.path)})
            crash_point("flatten.committed")
        finally:
            with self.files.lock:
                self.files.flattening.discard(snap.id)
        self.hooks.notify("flatten", {"image": snap.image, "snapshot": snap.id})
        return {"snapshot": snap.name, "old_depth": snap.depth, "depth": 1}
