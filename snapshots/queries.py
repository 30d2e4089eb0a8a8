"""Reading the snapshot store: snapshots, images, assignments, references an admin types, and the state
the boot plan decides from (bootd.bootplan.snapshot_choice); no changes here.

Every method is synchronous and safe to call from a worker thread (StateStore serialises the connection).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bootd.bootplan import snapshot_choice

from .bootfiles import BootFileStore
from .errors import NotFound, SnapshotError
from .files import LayerFiles, allocated
from .hooks import StoreHooks
from .model import ALL_GROUPS, Assignment, Snapshot

if TYPE_CHECKING:
    import sqlite3

    from bootd.state import ReplayCursor, StateStore

SNAP_SELECT = "SELECT s.*, i.name AS image FROM snapshots s JOIN images i ON i.id = s.image_id "


def fetch_one(cur: ReplayCursor, sql: str, params: tuple[Any, ...]) -> sqlite3.Row:
    """The row a statement must find: rows of snapshots and assignments are marked, never removed."""
    row = cur.execute(sql, params).fetchone()
    if row is None:
        raise SnapshotError(f"the store has no row for {params!r} (was the database replaced?)", status=500)
    return row


def inserted_id(cur: ReplayCursor) -> int:
    """The id of the row the last INSERT made."""
    rowid = cur.lastrowid
    if rowid is None:
        raise SnapshotError("the database did not say which row it inserted", status=500)
    return rowid


def name_in(cur: ReplayCursor, snapshot_id: int) -> str:
    """A snapshot's name ("deb@v3", "deb@draft-17") read inside a transaction."""
    r = fetch_one(cur, "SELECT s.id, s.version, i.name FROM snapshots s JOIN images i ON i.id = s.image_id "
                       "WHERE s.id = ?", (snapshot_id,))
    return f"{r['name']}@v{r['version']}" if r["version"] is not None else f"{r['name']}@draft-{r['id']}"


class SnapshotQueries:
    """The store's reads; the other parts (lifecycle, prune, fsck) ask it for the current rows."""

    def __init__(self, state: StateStore, files: LayerFiles, hooks: StoreHooks):
        self.state = state
        self.files = files
        self.hooks = hooks
        self.boot_files: BootFileStore | None = None  # native images' kernels (snapshots/bootfiles.py)

    # ------------------------------------------------------------------ snapshots and images
    def row_to_snapshot(self, r: sqlite3.Row, depth: int | None = None) -> Snapshot:
        return Snapshot(
            id=r["id"], image=r["image"], image_id=r["image_id"], version=r["version"], state=r["state"],
            parent_id=r["parent_id"], backing_id=r["backing_id"], path=str(self.files.path_of(r["file"])),
            file=r["file"], virtual_size=r["virtual_size"], note=r["note"], created_at=r["created_at"],
            created_by=r["created_by"], sealed_at=r["sealed_at"], sealed_by=r["sealed_by"],
            kernel_release=r["kernel_release"], depth=depth if depth is not None else self._depth(r["id"]))

    def _depth(self, snapshot_id: int) -> int:
        rows = self.state.query(
            """WITH RECURSIVE chain(id, backing_id, n) AS (
                   SELECT id, backing_id, 1 FROM snapshots WHERE id = ?
                   UNION ALL
                   SELECT s.id, s.backing_id, chain.n + 1 FROM snapshots s JOIN chain ON s.id = chain.backing_id
                   WHERE chain.n < 1000)
               SELECT MAX(n) FROM chain""", (snapshot_id,))
        return int(rows[0][0] or 1)

    def get(self, snapshot_id: int) -> Snapshot:
        rows = self.state.query(SNAP_SELECT + "WHERE s.id = ?", (int(snapshot_id),))
        if not rows:
            raise NotFound(f"no snapshot with id {snapshot_id}")
        return self.row_to_snapshot(rows[0])

    def all_rows(self) -> list[sqlite3.Row]:
        """Every snapshot row, deleted ones too, oldest first (for fsck)."""
        return self.state.query(SNAP_SELECT + "ORDER BY s.id")

    def images(self) -> list[dict[str, Any]]:
        out = []
        for r in self.state.query("SELECT * FROM images ORDER BY name"):
            snaps = self.snapshots(r["name"])
            sealed = [s for s in snaps if s.sealed]
            current = self.current(r["name"], ALL_GROUPS)
            out.append({
                "name": r["name"], "id": r["id"], "virtual_size": r["virtual_size"],
                "created_at": r["created_at"], "created_by": r["created_by"], "source": r["source"],
                "snapshots": len(sealed), "drafts": sum(1 for s in snaps if s.state == "draft"),
                "latest": sealed[-1].name if sealed else None,
                "current": current.name if current else None,
                "max_depth": max((s.depth for s in snaps), default=0),
                "bytes_on_disk": sum(allocated(s.path) for s in snaps),
            })
        return out

    def image_exists(self, name: str) -> bool:
        return bool(self.state.query("SELECT 1 FROM images WHERE name = ?", (name,)))

    def image_row(self, name: str) -> sqlite3.Row:
        rows = self.state.query("SELECT * FROM images WHERE name = ?", (name,))
        if not rows:
            known = [r["name"] for r in self.state.query("SELECT name FROM images ORDER BY name")]
            raise NotFound(f"no image named {name!r}" + (f" (images: {', '.join(known)})" if known else
                                                          " (no images yet: bootctl image import NAME FILE)"))
        return rows[0]

    def snapshots(self, image: str | None = None, include_deleted: bool = False) -> list[Snapshot]:
        sql = SNAP_SELECT
        cond: list[str] = []
        params: list[Any] = []
        if image is not None:
            self.image_row(image)
            cond.append("i.name = ?")
            params.append(image)
        if not include_deleted:
            cond.append("s.state IN ('draft', 'sealed', 'deleting')")
        if cond:
            sql += "WHERE " + " AND ".join(cond)
        sql += " ORDER BY i.name, s.version IS NULL, s.version, s.id"
        rows = self.state.query(sql, tuple(params))
        by_id = {r["id"]: r for r in rows}
        depths: dict[int, int] = {}

        def depth(sid: int) -> int:
            if sid in depths:
                return depths[sid]
            r = by_id.get(sid)
            if r is None:
                d = self._depth(sid)
            else:
                d = 1 if r["backing_id"] is None else 1 + depth(r["backing_id"])
            depths[sid] = d
            return d

        return [self.row_to_snapshot(r, depth(r["id"])) for r in rows]

    def resolve(self, ref: str | int, image: str | None = None) -> Snapshot:
        """A snapshot from "17", "debian@v3", "debian@3", "debian@draft-17", "debian@current", "debian@latest",
        or a bare image name (= its latest sealed snapshot)."""
        text = str(ref).strip()
        if text.isdigit() and image is None:
            return self.get(int(text))
        if "@" in text:
            image, _, which = text.partition("@")
        elif image is not None:
            which = text
        else:
            image, which = text, "latest"
        img = self.image_row(image)
        which = which.strip().lower()
        if which == "latest":
            rows = self.state.query(SNAP_SELECT + "WHERE s.image_id = ? AND s.state = 'sealed' "
                                    "ORDER BY s.version DESC LIMIT 1", (img["id"],))
            if not rows:
                raise NotFound(f"image {image} has no sealed snapshot")
            return self.row_to_snapshot(rows[0])
        if which == "current":
            cur = self.current(image, ALL_GROUPS)
            if cur is None:
                raise NotFound(f"image {image} has no current snapshot for all groups (promote one first)")
            return cur
        if which.startswith("draft-") and which[6:].isdigit():
            snap = self.get(int(which[6:]))
            if snap.image != image:
                raise NotFound(f"snapshot {which} belongs to image {snap.image}, not {image}")
            return snap
        num = which[1:] if which.startswith("v") else which
        if not num.isdigit():
            raise SnapshotError(f"{ref!r} is not a snapshot reference "
                                f"(use ID, IMAGE@vN, IMAGE@draft-ID, IMAGE@current or IMAGE@latest)")
        rows = self.state.query(SNAP_SELECT + "WHERE s.image_id = ? AND s.version = ?", (img["id"], int(num)))
        if not rows:
            raise NotFound(f"image {image} has no snapshot v{num}")
        return self.row_to_snapshot(rows[0])

    # ------------------------------------------------------------------ assignments
    def _assignment_rows(self, where: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        return self.state.query(
            "SELECT a.*, i.name AS image, s.version AS version, s.id AS sid FROM assignments a "
            "JOIN images i ON i.id = a.image_id JOIN snapshots s ON s.id = a.snapshot_id "
            f"WHERE {where} ORDER BY a.id", params)

    @staticmethod
    def _to_assignment(r: sqlite3.Row) -> Assignment:
        snapname = f"{r['image']}@v{r['version']}" if r["version"] is not None else f"{r['image']}@draft-{r['sid']}"
        return Assignment(id=r["id"], image=r["image"], kind=r["kind"], target=r["target"],
                          snapshot_id=r["snapshot_id"], snapshot=snapname, status=r["status"],
                          created_at=r["created_at"], created_by=r["created_by"], reason=r["reason"],
                          ended_at=r["ended_at"], ended_by=r["ended_by"])

    def assignments(self, image: str | None = None, active_only: bool = True) -> list[Assignment]:
        cond: list[str] = ["1=1"]
        params: list[Any] = []
        if image is not None:
            cond.append("i.name = ?")
            params.append(image)
        if active_only:
            cond.append("a.status = 'active'")
        return [self._to_assignment(r) for r in self._assignment_rows(" AND ".join(cond), tuple(params))]

    def _active(self, image_id: int, kind: str, target: str) -> Snapshot | None:
        rows = self.state.query(
            SNAP_SELECT + "JOIN assignments a ON a.snapshot_id = s.id "
            "WHERE a.image_id = ? AND a.kind = ? AND a.target = ? AND a.status = 'active' "
            "AND s.state IN ('sealed', 'draft')", (image_id, kind, target))
        return self.row_to_snapshot(rows[0]) if rows else None

    def current(self, image: str, group: str | None = ALL_GROUPS) -> Snapshot | None:
        """The snapshot promoted for exactly this group (None if that group has no promotion of its own)."""
        img = self.image_row(image)
        return self._active(img["id"], "current", group or ALL_GROUPS)

    def current_groups(self, image: str) -> set[str]:
        """The groups (ALL_GROUPS included) that have a current snapshot of `image` of their own."""
        return {r["target"] for r in self.state.query(
            "SELECT DISTINCT a.target FROM assignments a JOIN images i ON i.id = a.image_id "
            "WHERE i.name = ? AND a.kind = 'current' AND a.status = 'active'", (image,))}

    def assigned(self, image: str, kind: str, target: str) -> Snapshot | None:
        """The snapshot of the active `kind` assignment of `image` to `target` (bootd.bootplan's
        SnapshotState); None if there is none or no such image."""
        rows = self.state.query("SELECT id FROM images WHERE name = ?", (image,))
        return self._active(rows[0]["id"], kind, target) if rows else None

    def boot_dir(self, snap: Snapshot) -> str | None:
        """Where the snapshot's own kernel and initramfs are, relative to the boot root (None: it has none)."""
        if snap.kernel_release is None or self.boot_files is None:
            return None
        return self.boot_files.rel_dir(snap.image, snap.id)

    def boot_dir_for(self, snapshot_id: int) -> str | None:
        """The boot files a snapshot boots: its own, or for a draft its nearest ancestor's."""
        sid: int | None = snapshot_id
        seen: set[int] = set()
        while sid is not None and sid not in seen:
            seen.add(sid)
            snap = self.get(sid)
            where = self.boot_dir(snap)
            if where is not None:
                return where
            sid = snap.parent_id
        return None

    def resolve_for_host(self, mac: str, group: str | None, image: str) -> Snapshot | None:
        """What `mac` boots of `image`: the boot plan's rule (bootd.bootplan.snapshot_choice)."""
        return snapshot_choice(self, mac, group, image)[0]

    def boot_choice(self, mac: str, group: str | None, image: str) -> tuple[Snapshot | None, str]:
        """Like resolve_for_host, plus why: 'maintenance', 'pinned', 'test', 'group GROUP', 'all groups'."""
        return snapshot_choice(self, mac, group, image)

    def _rollback_stack(self, image_id: int, group: str) -> list[sqlite3.Row]:
        """Promotions of (image, group) a rollback can return to, oldest first; last one is active."""
        return self.state.query(
            "SELECT a.*, s.state AS snap_state FROM assignments a JOIN snapshots s ON s.id = a.snapshot_id "
            "WHERE a.image_id = ? AND a.kind = 'current' AND a.target = ? "
            "AND a.status IN ('active', 'superseded') ORDER BY a.id", (image_id, group))

    def previous_for(self, group: str | None, image: str) -> Snapshot | None:
        """The snapshot a rollback of (image, group) would make current, if any."""
        img = self.image_row(image)
        stack = self._rollback_stack(img["id"], group or ALL_GROUPS)
        if not stack or stack[-1]["status"] != "active":
            return None
        for r in reversed(stack[:-1]):
            if r["snap_state"] == "sealed":
                return self.get(r["snapshot_id"])
        if (group or ALL_GROUPS) != ALL_GROUPS:
            everyone = self._active(img["id"], "current", ALL_GROUPS)  # a rollback returns the group to it
            if everyone is not None and everyone.id != stack[-1]["snapshot_id"]:
                return everyone
        return None

    def usage(self, snap: Snapshot) -> list[str]:
        """Why a snapshot may not be deleted: current, pinned, in test, maintenance, parent, open."""
        reasons = []
        for r in self.state.query(
                "SELECT kind, target FROM assignments WHERE snapshot_id = ? AND status = 'active' "
                "ORDER BY kind, target", (snap.id,)):
            kind, target = r["kind"], r["target"]
            if kind == "current":
                reasons.append("it is current for " + ("all groups" if target == ALL_GROUPS else f"group {target}"))
            elif kind == "pin":
                reasons.append(f"host {target} is pinned to it")
            elif kind == "test":
                reasons.append(f"it is in test on host {target}")
            else:
                reasons.append(f"host {target} boots it for maintenance")
        children = self.state.query(
            "SELECT s.id, s.version FROM snapshots s WHERE s.backing_id = ? "
            "AND s.state IN ('draft','sealed','deleting')", (snap.id,))
        if children:
            names = [f"{snap.image}@v{c['version']}" if c["version"] is not None else f"{snap.image}@draft-{c['id']}"
                     for c in children]
            reasons.append(f"it is the parent (backing file) of {', '.join(names)}")
        holders = self.hooks.open_by(snap)
        if holders:
            reasons.append(f"it is open by a client: {'; '.join(holders)}")
        if self.files.is_flattening(snap.id):
            reasons.append("a flatten of it is running")
        return reasons

    def deleted_with_active_assignments(self) -> list[sqlite3.Row]:
        """Active assignments (id, kind, target) on snapshots that are deleted (for fsck)."""
        return self.state.query("SELECT a.id, a.kind, a.target, s.state FROM assignments a JOIN snapshots s "
                                "ON s.id = a.snapshot_id WHERE a.status = 'active' AND s.state = 'deleted'")

    def has_snapshot_rows(self) -> bool:
        """Has this database ever held a snapshot (deleted ones count)?"""
        return bool(self.state.query("SELECT 1 FROM snapshots LIMIT 1"))

    # ------------------------------------------------------------------ the past
    def audit_log(self, image: str | None = None, limit: int = 100, actor: str | None = None,
                  action: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` audit rows, oldest first; `actor` and `target` match a part (the actor is
        "alice (uid 0)", "bob (dashboard, via 10.0.0.9)"), `action` and `image` the whole."""
        cond: list[str] = []
        params: list[Any] = []
        if image is not None:
            self.image_row(image)
            cond.append("image = ?")
            params.append(image)
        for column, value in (("actor", actor), ("target", target)):
            if value:
                cond.append(f"instr(lower({column}), lower(?)) > 0")
                params.append(value)
        if action:
            cond.append("action = ?")
            params.append(action)
        where = f" WHERE {' AND '.join(cond)}" if cond else ""
        rows = self.state.query(f"SELECT * FROM audit{where} ORDER BY id DESC LIMIT ?", (*params, int(limit)))
        out = []
        for r in reversed(rows):
            d = dict(r)
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def history(self, image: str, limit: int = 200) -> dict[str, Any]:
        """Everything an admin wants to know about an image's past: snapshots (also deleted ones),
        every assignment with its status, and the audit log."""
        return {
            "image": image,
            "snapshots": [s.to_dict() for s in self.snapshots(image, include_deleted=True)],
            "assignments": [a.to_dict() for a in self.assignments(image, active_only=False)],
            "audit": self.audit_log(image, limit),
        }
