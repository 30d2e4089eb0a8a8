"""SnapshotStore: OS images, each a history of immutable qcow2 layers, and who boots which.

Files live under `<storage>/snapshots/<image>/<uuid>.qcow2`; a layer's qcow2 backing file is its parent's
file name (relative, so the store can move). The database (bootd.state) says what exists; the files
follow it in an order that makes every crash recoverable:

- new files are written under `.tmp-<uuid>.qcow2`, fsynced, renamed to their final name, and only then
  get their row: a crash leaves a temp file or an unreferenced file, which fsck removes / sets aside;
- a seal chmods the file read-only before the row says "sealed": fsck makes the mode follow the row;
- a delete marks the row "deleting" before unlinking and "deleted" after: fsck finishes it;
- a flatten renames a standalone copy over the layer (same content) before the row drops its backing:
  fsck reads the backing from the qcow2 header and makes the row follow the file;
- promote/rollback/test/pin touch rows only, in one transaction with their audit entry.

Every method is synchronous and safe to call from a worker thread (StateStore serialises the
connection); the HTTP API runs them with asyncio.to_thread.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from bootd.bootplan import snapshot_choice
from bootd.macaddr import parse_mac
from bootd.units import human

from . import qemu
from .crash import crash_point
from .errors import NoSpace, NotFound, Refused, SnapshotError
from .model import ALL_GROUPS, Assignment, FsckReport, Snapshot, valid_image_name

log = logging.getLogger("bootd.snapshots")

MiB = 1024 * 1024
DRAFT_SPACE = 4 * MiB          # a fresh overlay is ~200 KiB; ask for a little room to start writing
DEFAULT_DEPTH_WARNING = 8      # chains deeper than this are flagged: read latency grows with depth
LOST_FOUND = "lost+found"
TEMP_PREFIX = ".tmp-"

OpenCheck = Callable[[Snapshot], Iterable[str]]
Listener = Callable[[str, dict], None]


def parse_size(text: str | int) -> int:
    """'20G', '512M', '1.5T', '1073741824' -> bytes (binary units, like qemu-img)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise SnapshotError(f"{text!r} is not a size (examples: 20G, 512M, 1073741824)") from None
    if value <= 0:
        raise SnapshotError(f"size must be positive, not {text!r}")
    return value


def read_qcow2_header(path: str) -> tuple[int, str | None]:
    """(virtual size, backing file name or None) straight from the qcow2 header: no subprocess, so
    fsck over hundreds of layers at start-up stays fast."""
    with open(path, "rb") as f:
        head = f.read(32)
        if len(head) < 32 or head[:4] != b"QFI\xfb":
            raise SnapshotError(f"{path}: not a qcow2 file")
        _version, bf_off, bf_size, _cbits, size = struct.unpack(">IQIIQ", head[4:32])
        backing = None
        if bf_off and bf_size:
            f.seek(bf_off)
            backing = f.read(bf_size).decode("utf-8", errors="replace")
    return size, backing


class SnapshotStore:
    """The images, their snapshots and their assignments; see the module docstring for the file rules."""

    def __init__(self, state, root: str | Path, min_free_bytes: int = 0,
                 depth_warning: int = DEFAULT_DEPTH_WARNING):
        self.state = state
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_bytes)
        self.depth_warning = int(depth_warning)
        self._open_checks: list[OpenCheck] = []
        self._listeners: list[Listener] = []
        self._busy: set[int] = set()          # snapshot ids with a flatten running
        self._busy_lock = threading.Lock()
        self._inflight: set[str] = set()       # file names of operations under way: fsck leaves them alone

    # ------------------------------------------------------------------ hooks for other components
    def register_open_check(self, fn: OpenCheck) -> None:
        """fn(snapshot) -> descriptions of whoever has the snapshot's file open (NBD exports)."""
        self._open_checks.append(fn)

    def open_by(self, snap: Snapshot) -> list[str]:
        holders: list[str] = []
        for fn in list(self._open_checks):
            try:
                holders.extend(str(h) for h in (fn(snap) or ()))
            except Exception as exc:  # a broken hook must not make a delete succeed silently
                holders.append(f"open check failed ({exc})")
        return holders

    def is_open(self, snap: Snapshot) -> bool:
        return bool(self.open_by(snap))

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _notify(self, event: str, detail: dict) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, detail)
            except Exception:
                log.exception("snapshot listener failed on %s", event)

    # ------------------------------------------------------------------ reading
    def _rows_to_snapshots(self, rows) -> list[Snapshot]:
        return [self._row_to_snapshot(r) for r in rows]

    def _row_to_snapshot(self, r, depth: int | None = None) -> Snapshot:
        return Snapshot(
            id=r["id"], image=r["image"], image_id=r["image_id"], version=r["version"], state=r["state"],
            parent_id=r["parent_id"], backing_id=r["backing_id"], path=str(self.root / r["file"]),
            file=r["file"], virtual_size=r["virtual_size"], note=r["note"], created_at=r["created_at"],
            created_by=r["created_by"], sealed_at=r["sealed_at"], sealed_by=r["sealed_by"],
            depth=depth if depth is not None else self._depth(r["id"]))

    _SNAP_SELECT = ("SELECT s.*, i.name AS image FROM snapshots s JOIN images i ON i.id = s.image_id ")

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
        rows = self.state.query(self._SNAP_SELECT + "WHERE s.id = ?", (int(snapshot_id),))
        if not rows:
            raise NotFound(f"no snapshot with id {snapshot_id}")
        return self._row_to_snapshot(rows[0])

    def snapshot_path(self, snapshot_id: int) -> str:
        """Absolute path of a snapshot's qcow2 file (for the NBD engine)."""
        return self.get(snapshot_id).path

    def images(self) -> list[dict]:
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
                "bytes_on_disk": sum(_allocated(s.path) for s in snaps),
            })
        return out

    def _image_row(self, name: str):
        rows = self.state.query("SELECT * FROM images WHERE name = ?", (name,))
        if not rows:
            known = [r["name"] for r in self.state.query("SELECT name FROM images ORDER BY name")]
            raise NotFound(f"no image named {name!r}" + (f" (images: {', '.join(known)})" if known else
                                                          " (no images yet: bootctl image import NAME FILE)"))
        return rows[0]

    def snapshots(self, image: str | None = None, include_deleted: bool = False) -> list[Snapshot]:
        sql = self._SNAP_SELECT
        cond, params = [], []
        if image is not None:
            self._image_row(image)
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

        return [self._row_to_snapshot(r, depth(r["id"])) for r in rows]

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
        img = self._image_row(image)
        which = which.strip().lower()
        if which == "latest":
            rows = self.state.query(self._SNAP_SELECT + "WHERE s.image_id = ? AND s.state = 'sealed' "
                                    "ORDER BY s.version DESC LIMIT 1", (img["id"],))
            if not rows:
                raise NotFound(f"image {image} has no sealed snapshot")
            return self._row_to_snapshot(rows[0])
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
        rows = self.state.query(self._SNAP_SELECT + "WHERE s.image_id = ? AND s.version = ?", (img["id"], int(num)))
        if not rows:
            raise NotFound(f"image {image} has no snapshot v{num}")
        return self._row_to_snapshot(rows[0])

    # ------------------------------------------------------------------ assignments
    def _assignment_rows(self, where: str, params: tuple):
        return self.state.query(
            "SELECT a.*, i.name AS image, s.version AS version, s.id AS sid FROM assignments a "
            "JOIN images i ON i.id = a.image_id JOIN snapshots s ON s.id = a.snapshot_id "
            f"WHERE {where} ORDER BY a.id", params)

    def _to_assignment(self, r) -> Assignment:
        snapname = f"{r['image']}@v{r['version']}" if r["version"] is not None else f"{r['image']}@draft-{r['sid']}"
        return Assignment(id=r["id"], image=r["image"], kind=r["kind"], target=r["target"],
                          snapshot_id=r["snapshot_id"], snapshot=snapname, status=r["status"],
                          created_at=r["created_at"], created_by=r["created_by"], reason=r["reason"],
                          ended_at=r["ended_at"], ended_by=r["ended_by"])

    def assignments(self, image: str | None = None, active_only: bool = True) -> list[Assignment]:
        cond, params = ["1=1"], []
        if image is not None:
            cond.append("i.name = ?")
            params.append(image)
        if active_only:
            cond.append("a.status = 'active'")
        return [self._to_assignment(r) for r in self._assignment_rows(" AND ".join(cond), tuple(params))]

    def _active(self, image_id: int, kind: str, target: str) -> Snapshot | None:
        rows = self.state.query(
            self._SNAP_SELECT + "JOIN assignments a ON a.snapshot_id = s.id "
            "WHERE a.image_id = ? AND a.kind = ? AND a.target = ? AND a.status = 'active' "
            "AND s.state IN ('sealed', 'draft')", (image_id, kind, target))
        return self._row_to_snapshot(rows[0]) if rows else None

    def current(self, image: str, group: str | None = ALL_GROUPS) -> Snapshot | None:
        """The snapshot promoted for exactly this group (None if that group has no promotion of its own)."""
        img = self._image_row(image)
        return self._active(img["id"], "current", group or ALL_GROUPS)

    def assigned(self, image: str, kind: str, target: str) -> Snapshot | None:
        """The snapshot of the active `kind` assignment of `image` to `target` (bootd.bootplan's
        SnapshotState); None if there is none or no such image."""
        rows = self.state.query("SELECT id FROM images WHERE name = ?", (image,))
        return self._active(rows[0]["id"], kind, target) if rows else None

    def resolve_for_host(self, mac: str, group: str | None, image: str) -> Snapshot | None:
        """What `mac` boots of `image`: the boot plan's rule (bootd.bootplan.snapshot_choice)."""
        return snapshot_choice(self, mac, group, image)[0]

    def boot_choice(self, mac: str, group: str | None, image: str) -> tuple[Snapshot | None, str]:
        """Like resolve_for_host, plus why: 'maintenance', 'pinned', 'test', 'group GROUP', 'all groups'."""
        return snapshot_choice(self, mac, group, image)

    def _rollback_stack(self, image_id: int, group: str) -> list:
        """Promotions of (image, group) a rollback can return to, oldest first; last one is active."""
        return self.state.query(
            "SELECT a.*, s.state AS snap_state FROM assignments a JOIN snapshots s ON s.id = a.snapshot_id "
            "WHERE a.image_id = ? AND a.kind = 'current' AND a.target = ? "
            "AND a.status IN ('active', 'superseded') ORDER BY a.id", (image_id, group))

    def previous_for(self, group: str | None, image: str) -> Snapshot | None:
        """The snapshot a rollback of (image, group) would make current, if any."""
        img = self._image_row(image)
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
                "SELECT kind, target FROM assignments WHERE snapshot_id = ? AND status = 'active' ORDER BY kind, target",
                (snap.id,)):
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
            "SELECT s.id, s.version FROM snapshots s WHERE s.backing_id = ? AND s.state IN ('draft','sealed','deleting')",
            (snap.id,))
        if children:
            names = [f"{snap.image}@v{c['version']}" if c["version"] is not None else f"{snap.image}@draft-{c['id']}"
                     for c in children]
            reasons.append(f"it is the parent (backing file) of {', '.join(names)}")
        holders = self.open_by(snap)
        if holders:
            reasons.append(f"it is open by a client: {'; '.join(holders)}")
        with self._busy_lock:
            if snap.id in self._busy:
                reasons.append("a flatten of it is running")
        return reasons

    # ------------------------------------------------------------------ helpers for changes
    def _audit(self, cur, actor: str, action: str, image: str | None, snapshot_id: int | None,
               target: str | None = None, reason: str = "", detail: dict | None = None) -> None:
        cur.execute("INSERT INTO audit(at, actor, action, image, snapshot_id, target, reason, detail) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (time.time(), actor or "unknown", action, image, snapshot_id, target, reason or "",
                     json.dumps(detail, sort_keys=True) if detail else None))

    def audit_log(self, image: str | None = None, limit: int = 100) -> list[dict]:
        if image is not None:
            self._image_row(image)
            rows = self.state.query("SELECT * FROM audit WHERE image = ? ORDER BY id DESC LIMIT ?", (image, int(limit)))
        else:
            rows = self.state.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (int(limit),))
        out = []
        for r in reversed(rows):
            d = dict(r)
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def history(self, image: str, limit: int = 200) -> dict:
        """Everything an admin wants to know about an image's past: snapshots (also deleted ones),
        every assignment with its status, and the audit log."""
        return {
            "image": image,
            "snapshots": [s.to_dict() for s in self.snapshots(image, include_deleted=True)],
            "assignments": [a.to_dict() for a in self.assignments(image, active_only=False)],
            "audit": self.audit_log(image, limit),
        }

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, need: int, what: str) -> None:
        """Refuse a write that would leave less than the reserve free (storage.min_free_mb)."""
        free = self.free_bytes()
        if need + self.min_free_bytes > free:
            raise NoSpace(
                f"not enough free space in {self.root} to {what}: it needs {human(need)} plus the reserve of "
                f"{human(self.min_free_bytes)} (storage.min_free_mb), and only {human(free)} is free. "
                f"Free some space (bootctl snapshot prune IMAGE --keep N) and try again.")

    def _image_dir(self, image: str) -> Path:
        d = self.root / image
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _new_file(self, image: str) -> tuple[Path, Path, str]:
        """(temp path, final path, relative file name) for a new layer of `image`."""
        u = uuid.uuid4().hex
        d = self._image_dir(image)
        with self._busy_lock:
            self._inflight.update({f"{image}/{TEMP_PREFIX}{u}.qcow2", f"{image}/{u}.qcow2"})
        return d / f"{TEMP_PREFIX}{u}.qcow2", d / f"{u}.qcow2", f"{image}/{u}.qcow2"

    def _release(self, rel: str) -> None:
        """The operation that made `rel` has committed or given up: fsck may judge its files again."""
        image, _, name = rel.partition("/")
        with self._busy_lock:
            self._inflight.discard(rel)
            self._inflight.discard(f"{image}/{TEMP_PREFIX}{name}")

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        qemu.fsync_file(str(tmp))
        os.rename(tmp, final)
        qemu.fsync_dir(str(final.parent))

    def _warnings_for(self, snap: Snapshot) -> list[str]:
        if snap.depth > self.depth_warning:
            return [f"{snap.name} has a chain of {snap.depth} layers (more than {self.depth_warning}): reads "
                    f"get slower with every layer; run `bootctl snapshot flatten {snap.name}`"]
        return []

    def _require_host(self, host: str) -> str:
        mac = parse_mac(host or "")
        if mac is None:
            raise SnapshotError(f"{host!r} is not a MAC address")
        return mac

    # ------------------------------------------------------------------ images
    def create_image(self, name: str, size: int | str, actor: str, reason: str = "") -> Snapshot:
        """A new image whose first snapshot (v1) is an empty disk of `size`."""
        size = parse_size(size)
        self.check_new_image(name)
        self.check_space(DRAFT_SPACE, f"create image {name}")
        tmp, final, rel = self._new_file(name)
        try:
            try:
                qemu.create_empty(str(tmp), size)
                os.chmod(tmp, 0o444)
                self._publish(tmp, final)
            except BaseException:
                _unlink_quiet(tmp)
                raise
            snap = self._commit_first(name, size, rel, f"empty {human(size)}", actor, reason, "image-create",
                                      "empty disk")
        finally:
            self._release(rel)
        self._notify("image-create", {"image": name, "snapshot": snap.id})
        return snap

    def check_new_image(self, name: str) -> None:
        if not valid_image_name(name):
            raise SnapshotError(f"{name!r} is not a valid image name: 1-63 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit")
        if self.state.query("SELECT 1 FROM images WHERE name = ?", (name,)):
            raise Refused(f"image {name} already exists (import into a new name, or draft a new snapshot of it)")

    def _commit_first(self, name: str, size: int, rel: str, source: str, actor: str, reason: str,
                      action: str, note: str) -> Snapshot:
        now = time.time()
        try:
            with self.state.transaction() as cur:
                if cur.execute("SELECT 1 FROM images WHERE name = ?", (name,)).fetchone():
                    raise Refused(f"image {name} already exists")
                cur.execute("INSERT INTO images(name, virtual_size, created_at, created_by, source) VALUES (?,?,?,?,?)",
                            (name, size, now, actor, source))
                image_id = cur.lastrowid
                cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                            "virtual_size, note, created_at, created_by, sealed_at, sealed_by) "
                            "VALUES (?, 1, 'sealed', NULL, NULL, ?, ?, ?, ?, ?, ?, ?)",
                            (image_id, rel, size, note, now, actor, now, actor))
                sid = cur.lastrowid
                self._audit(cur, actor, action, name, sid, None, reason, {"source": source, "size": size})
                crash_point("import.in-txn")
        except BaseException:
            _unlink_quiet(self.root / rel)
            raise
        crash_point("import.committed")
        return self.get(sid)

    def import_image(self, name: str, file: str, actor: str, reason: str = "",
                     progress: Callable[[float], None] | None = None) -> Snapshot:
        """Import a raw or qcow2 disk image as v1 of a new image (a standalone qcow2 copy)."""
        self.check_new_image(name)
        found = qemu.check_importable(file)
        need = qemu.measure(file, found.format)
        self.check_space(need, f"import {file} ({human(need)} as qcow2)")
        crash_point("import.before")
        tmp, final, rel = self._new_file(name)
        try:
            try:
                qemu.convert(file, found.format, str(tmp), progress)
                crash_point("import.converted")
                os.chmod(tmp, 0o444)
                self._publish(tmp, final)
            except BaseException:
                _unlink_quiet(tmp)
                raise
            crash_point("import.renamed")
            snap = self._commit_first(name, found.virtual_size, rel, os.path.abspath(file), actor, reason,
                                      "image-import", f"imported from {os.path.basename(file)}")
        finally:
            self._release(rel)
        self._notify("image-import", {"image": name, "snapshot": snap.id})
        return snap

    # ------------------------------------------------------------------ lifecycle
    def draft(self, ref: str | int, actor: str, reason: str = "", host: str | None = None) -> Snapshot:
        """A new writable layer on top of a sealed snapshot; with `host`, that host boots it (writable)."""
        parent = self.resolve(ref)
        if parent.state == "draft":
            raise Refused(f"{parent.name} is a draft: seal it first (bootctl snapshot seal {parent.name}), "
                          f"then draft from the sealed snapshot")
        if parent.state != "sealed":
            raise Refused(f"{parent.name} is {parent.state}: cannot draft from it")
        mac = self._require_host(host) if host else None
        if not os.path.exists(parent.path):
            raise SnapshotError(f"{parent.name}: its file {parent.path} is missing (run bootctl snapshot fsck)",
                                status=500)
        self.check_space(DRAFT_SPACE, f"create a draft of {parent.name}")
        crash_point("draft.before")
        tmp, final, rel = self._new_file(parent.image)
        try:
            return self._draft_files(parent, mac, tmp, final, rel, actor, reason)
        finally:
            self._release(rel)

    def _draft_files(self, parent: Snapshot, mac: str | None, tmp: Path, final: Path, rel: str, actor: str,
                     reason: str) -> Snapshot:
        try:
            qemu.create_overlay(str(tmp), os.path.basename(parent.path))
            crash_point("draft.file-made")
            self._publish(tmp, final)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        crash_point("draft.renamed")
        now = time.time()
        try:
            with self.state.transaction() as cur:
                row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (parent.id,)).fetchone()
                if row is None or row["state"] != "sealed":
                    raise Refused(f"{parent.name} was {row['state'] if row else 'removed'} meanwhile: cannot draft from it")
                cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                            "virtual_size, note, created_at, created_by) VALUES (?, NULL, 'draft', ?, ?, ?, ?, '', ?, ?)",
                            (parent.image_id, parent.id, parent.id, rel, parent.virtual_size, now, actor))
                sid = cur.lastrowid
                if mac:
                    self._assign(cur, parent.image_id, "maintenance", mac, sid, actor, reason, now)
                self._audit(cur, actor, "draft", parent.image, sid, mac, reason, {"parent": parent.name})
        except BaseException:
            _unlink_quiet(final)
            raise
        crash_point("draft.committed")
        snap = self.get(sid)
        self._notify("draft", {"image": snap.image, "snapshot": sid, "host": mac})
        return snap

    def draft_from_layer(self, snapshot_id: int, layer_path: str, note: str = "", actor: str = "bootd",
                         reason: str = "", remove_source: bool = True) -> Snapshot:
        """Adopt a qcow2 layer whose backing file is snapshot `snapshot_id` (e.g. a host's disk overlay, after
        its export is closed) as a new draft of that image. The layer is copied in (temp name, fsync,
        rename, row), and the source removed only after the row is committed: a crash loses nothing."""
        parent = self.get(snapshot_id)
        if parent.state != "sealed":
            raise Refused(f"cannot adopt a layer on {parent.name}: it is {parent.state}")
        src = os.path.abspath(layer_path)
        try:
            size, backing = read_qcow2_header(src)
        except OSError as exc:
            raise SnapshotError(f"cannot read {src}: {exc}") from exc
        if backing is None:
            raise Refused(f"{src} has no backing file: it is not a layer on {parent.name}")
        resolved = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(src), backing)
        if os.path.realpath(resolved) != os.path.realpath(parent.path):
            raise Refused(f"{src} is a layer on {backing}, not on {parent.name} ({parent.path})")
        if size != parent.virtual_size:
            raise Refused(f"{src} is {human(size)} but {parent.name} is {human(parent.virtual_size)}")
        self.check_space(_allocated(src), f"adopt {os.path.basename(src)} as a draft of {parent.name}")
        tmp, final, rel = self._new_file(parent.image)
        try:
            try:
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", src, str(tmp)], check=True,
                               capture_output=True, text=True)
                os.chmod(tmp, 0o644)
                qemu.rebase_unsafe(str(tmp), os.path.basename(parent.path))
                self._publish(tmp, final)
            except subprocess.CalledProcessError as exc:
                _unlink_quiet(tmp)
                raise SnapshotError(f"cannot copy {src}: {exc.stderr.strip()}", status=500) from exc
            except BaseException:
                _unlink_quiet(tmp)
                raise
            now = time.time()
            try:
                with self.state.transaction() as cur:
                    cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                                "virtual_size, note, created_at, created_by) VALUES (?, NULL, 'draft', ?, ?, ?, ?, ?, ?, ?)",
                                (parent.image_id, parent.id, parent.id, rel, parent.virtual_size, note or "", now, actor))
                    sid = cur.lastrowid
                    self._audit(cur, actor, "adopt-layer", parent.image, sid, None, reason,
                                {"parent": parent.name, "source": src})
            except BaseException:
                _unlink_quiet(final)
                raise
        finally:
            self._release(rel)
        if remove_source:
            _unlink_quiet(src)
        snap = self.get(sid)
        self._notify("draft", {"image": snap.image, "snapshot": sid, "source": src})
        return snap

    def _assign(self, cur, image_id: int, kind: str, target: str, snapshot_id: int, actor: str, reason: str,
                now: float, end_status: str = "ended") -> int | None:
        """Make (image, kind, target) point at snapshot_id; returns the id of the assignment it replaced."""
        old = cur.execute("SELECT id FROM assignments WHERE image_id = ? AND kind = ? AND target = ? "
                          "AND status = 'active'", (image_id, kind, target)).fetchone()
        if old is not None:
            cur.execute("UPDATE assignments SET status = ?, ended_at = ?, ended_by = ? WHERE id = ?",
                        (end_status, now, actor, old["id"]))
        cur.execute("INSERT INTO assignments(image_id, kind, target, snapshot_id, status, created_at, created_by, "
                    "reason) VALUES (?,?,?,?, 'active', ?,?,?)",
                    (image_id, kind, target, snapshot_id, now, actor, reason or ""))
        return old["id"] if old is not None else None

    def seal(self, ref: str | int, note: str, actor: str, reason: str = "") -> Snapshot:
        """The draft becomes an immutable snapshot: next version number, its note, file read-only."""
        snap = self.resolve(ref)
        if snap.state != "draft":
            raise Refused(f"{snap.name} is {snap.state}, not a draft: only drafts can be sealed")
        holders = self.open_by(snap)
        if holders:
            raise Refused(f"cannot seal {snap.name}: it is open by a client ({'; '.join(holders)}); "
                          f"shut the maintenance host down first")
        if not os.path.exists(snap.path):
            raise SnapshotError(f"{snap.name}: its file is missing (run bootctl snapshot fsck)", status=500)
        qemu.check(snap.path)
        crash_point("seal.before")
        os.chmod(snap.path, 0o444)
        crash_point("seal.chmod-done")
        now = time.time()
        try:
            with self.state.transaction() as cur:
                row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (snap.id,)).fetchone()
                if row["state"] != "draft":
                    raise Refused(f"{snap.name} was {row['state']} meanwhile")
                version = cur.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM snapshots WHERE image_id = ?",
                                      (snap.image_id,)).fetchone()[0]
                cur.execute("UPDATE snapshots SET state = 'sealed', version = ?, note = ?, sealed_at = ?, "
                            "sealed_by = ? WHERE id = ?", (version, note or "", now, actor, snap.id))
                cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = ? "
                            "WHERE snapshot_id = ? AND kind = 'maintenance' AND status = 'active'",
                            (now, actor, snap.id))
                self._audit(cur, actor, "seal", snap.image, snap.id, None, reason,
                            {"version": version, "note": note or "", "draft": snap.name})
                crash_point("seal.in-txn")
        except BaseException:
            if self.get(snap.id).state == "draft":
                os.chmod(snap.path, 0o644)
            raise
        crash_point("seal.committed")
        sealed = self.get(snap.id)
        self._notify("seal", {"image": sealed.image, "snapshot": sealed.id, "version": sealed.version})
        return sealed

    def _require_bootable(self, snap: Snapshot, what: str) -> None:
        if snap.state == "draft":
            raise Refused(f"cannot {what} {snap.name}: it is a draft; seal it first "
                          f"(bootctl snapshot seal {snap.name} -m NOTE)")
        if snap.state != "sealed":
            raise Refused(f"cannot {what} {snap.name}: it is {snap.state}")

    def promote(self, ref: str | int, group: str | None, actor: str, reason: str = "") -> dict:
        """Make a sealed snapshot current for `group` (None/'*' = all groups); the previous one is remembered."""
        snap = self.resolve(ref)
        self._require_bootable(snap, "promote")
        target = group or ALL_GROUPS
        where = "all groups" if target == ALL_GROUPS else f"group {target}"
        crash_point("promote.before")
        now = time.time()
        with self.state.transaction() as cur:
            row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (snap.id,)).fetchone()
            if row["state"] != "sealed":
                raise Refused(f"cannot promote {snap.name}: it is {row['state']}")
            old = cur.execute("SELECT id, snapshot_id FROM assignments WHERE image_id = ? AND kind = 'current' "
                              "AND target = ? AND status = 'active'", (snap.image_id, target)).fetchone()
            if old is not None and old["snapshot_id"] == snap.id:
                raise Refused(f"{snap.name} is already current for {where}")
            if old is not None:
                cur.execute("UPDATE assignments SET status = 'superseded', ended_at = ?, ended_by = ? WHERE id = ?",
                            (now, actor, old["id"]))
            crash_point("promote.superseded")
            cur.execute("INSERT INTO assignments(image_id, kind, target, snapshot_id, status, created_at, created_by, "
                        "reason) VALUES (?, 'current', ?, ?, 'active', ?, ?, ?)",
                        (snap.image_id, target, snap.id, now, actor, reason or ""))
            crash_point("promote.inserted")
            previous = self._name_of(cur, old["snapshot_id"]) if old is not None else None
            self._audit(cur, actor, "promote", snap.image, snap.id, target, reason, {"previous": previous})
        crash_point("promote.committed")
        self._notify("promote", {"image": snap.image, "snapshot": snap.id, "group": target})
        return {"image": snap.image, "group": target, "current": snap.name, "previous": previous,
                "warnings": self._warnings_for(snap)}

    def _name_of(self, cur, snapshot_id: int) -> str:
        r = cur.execute("SELECT s.id, s.version, i.name FROM snapshots s JOIN images i ON i.id = s.image_id "
                        "WHERE s.id = ?", (snapshot_id,)).fetchone()
        return f"{r['name']}@v{r['version']}" if r["version"] is not None else f"{r['name']}@draft-{r['id']}"

    def rollback(self, image: str, group: str | None, actor: str, reason: str = "") -> dict:
        """Make the previously promoted snapshot current again; repeated rollbacks walk back the history."""
        img = self._image_row(image)
        target = group or ALL_GROUPS
        where = "all groups" if target == ALL_GROUPS else f"group {target}"
        crash_point("rollback.before")
        now = time.time()
        with self.state.transaction() as cur:
            stack = cur.execute(
                "SELECT a.id, a.status, a.snapshot_id, s.state AS snap_state FROM assignments a "
                "JOIN snapshots s ON s.id = a.snapshot_id WHERE a.image_id = ? AND a.kind = 'current' "
                "AND a.target = ? AND a.status IN ('active', 'superseded') ORDER BY a.id",
                (img["id"], target)).fetchall()
            if not stack or stack[-1]["status"] != "active":
                raise Refused(f"nothing to roll back: image {image} has no current snapshot for {where}")
            top = stack[-1]
            back = None
            skipped = []
            for r in reversed(stack[:-1]):
                if r["snap_state"] == "sealed":
                    back = r
                    break
                skipped.append(r)
            fallback = None
            if back is None and target != ALL_GROUPS:
                # the group's first own promotion: before it, the group followed the all-groups current
                fallback = cur.execute(
                    "SELECT snapshot_id FROM assignments WHERE image_id = ? AND kind = 'current' AND target = ? "
                    "AND status = 'active'", (img["id"], ALL_GROUPS)).fetchone()
            if back is None and fallback is None:
                raise Refused(f"nothing to roll back to: {self._name_of(cur, top['snapshot_id'])} is the first "
                              f"snapshot promoted for {where} of image {image} still in the history")
            cur.execute("UPDATE assignments SET status = 'rolled-back', ended_at = ?, ended_by = ? WHERE id = ?",
                        (now, actor, top["id"]))
            for r in skipped:  # promotions of snapshots deleted since: no longer a place to go back to
                cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = ? WHERE id = ?",
                            (now, actor, r["id"]))
            crash_point("rollback.popped")
            if back is not None:
                cur.execute("UPDATE assignments SET status = 'active', ended_at = NULL, ended_by = NULL "
                            "WHERE id = ?", (back["id"],))
                new_id = back["snapshot_id"]
            else:
                new_id = fallback["snapshot_id"]
            left = self._name_of(cur, top["snapshot_id"])
            now_current = self._name_of(cur, new_id)
            self._audit(cur, actor, "rollback", image, new_id, target, reason,
                        {"from": left, "to": now_current, "follows_all_groups": back is None})
        crash_point("rollback.committed")
        self._notify("rollback", {"image": image, "snapshot": new_id, "group": target})
        return {"image": image, "group": target, "current": now_current, "rolled_back": left,
                "follows_all_groups": back is None,
                "previous": (p.name if (p := self.previous_for(target, image)) else None)}

    def _host_assign(self, kind: str, ref: str | int, host: str, actor: str, reason: str) -> dict:
        snap = self.resolve(ref)
        self._require_bootable(snap, "test" if kind == "test" else "pin")
        mac = self._require_host(host)
        now = time.time()
        with self.state.transaction() as cur:
            row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (snap.id,)).fetchone()
            if row["state"] != "sealed":
                raise Refused(f"cannot {kind} {snap.name}: it is {row['state']}")
            old = cur.execute("SELECT snapshot_id FROM assignments WHERE image_id = ? AND kind = ? AND target = ? "
                              "AND status = 'active'", (snap.image_id, kind, mac)).fetchone()
            if old is not None and old["snapshot_id"] == snap.id:
                raise Refused(f"host {mac} is already {'testing' if kind == 'test' else 'pinned to'} {snap.name}")
            previous = self._name_of(cur, old["snapshot_id"]) if old is not None else None
            self._assign(cur, snap.image_id, kind, mac, snap.id, actor, reason, now)
            self._audit(cur, actor, kind, snap.image, snap.id, mac, reason, {"previous": previous})
        self._notify(kind, {"image": snap.image, "snapshot": snap.id, "host": mac})
        return {"image": snap.image, "host": mac, kind: snap.name, "previous": previous}

    def _host_unassign(self, kind: str, image: str, host: str, actor: str, reason: str) -> dict:
        img = self._image_row(image)
        mac = self._require_host(host)
        now = time.time()
        with self.state.transaction() as cur:
            old = cur.execute("SELECT id, snapshot_id FROM assignments WHERE image_id = ? AND kind = ? AND target = ? "
                              "AND status = 'active'", (img["id"], kind, mac)).fetchone()
            if old is None:
                what = {"pin": "pinned to", "test": "testing", "maintenance": "booting a draft of"}[kind]
                raise Refused(f"host {mac} is not {what} any snapshot of image {image}")
            cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = ? WHERE id = ?",
                        (now, actor, old["id"]))
            name = self._name_of(cur, old["snapshot_id"])
            self._audit(cur, actor, f"un{kind}" if kind != "test" else "end-test", image, old["snapshot_id"], mac,
                        reason)
        self._notify(f"un{kind}", {"image": image, "host": mac})
        return {"image": image, "host": mac, "ended": name}

    def test(self, ref, host: str, actor: str, reason: str = "") -> dict:
        """Boot a sealed snapshot on one host only, to try it before promoting it."""
        return self._host_assign("test", ref, host, actor, reason)

    def end_test(self, image: str, host: str, actor: str, reason: str = "") -> dict:
        return self._host_unassign("test", image, host, actor, reason)

    def pin(self, ref, host: str, actor: str, reason: str = "") -> dict:
        """The host boots this snapshot whatever its group's current is."""
        return self._host_assign("pin", ref, host, actor, reason)

    def unpin(self, image: str, host: str, actor: str, reason: str = "") -> dict:
        return self._host_unassign("pin", image, host, actor, reason)

    def end_maintenance(self, image: str, host: str, actor: str, reason: str = "") -> dict:
        return self._host_unassign("maintenance", image, host, actor, reason)

    # ------------------------------------------------------------------ deleting
    def delete(self, ref: str | int, actor: str, reason: str = "") -> dict:
        """Delete one snapshot or draft; refused with the reasons while anything uses it."""
        snap = self.resolve(ref)
        if snap.state in ("deleted",):
            raise Refused(f"{snap.name} is already deleted")
        reasons = self.usage(snap)
        if reasons:
            raise Refused(f"cannot delete {snap.name}: " + "; ".join(reasons))
        self._delete_one(snap, actor, reason, "delete")
        return {"deleted": [snap.name]}

    def _delete_one(self, snap: Snapshot, actor: str, reason: str, action: str) -> None:
        with self.state.transaction() as cur:
            row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (snap.id,)).fetchone()
            if row["state"] not in ("draft", "sealed", "deleting"):
                raise Refused(f"{snap.name} is {row['state']}")
            busy = cur.execute("SELECT kind, target FROM assignments WHERE snapshot_id = ? AND status = 'active'",
                               (snap.id,)).fetchall()
            children = cur.execute("SELECT 1 FROM snapshots WHERE backing_id = ? AND state IN "
                                   "('draft','sealed','deleting')", (snap.id,)).fetchall()
            if busy or children:
                raise Refused(f"cannot delete {snap.name}: it came into use meanwhile")
            cur.execute("UPDATE snapshots SET state = 'deleting' WHERE id = ?", (snap.id,))
            self._audit(cur, actor, action, snap.image, snap.id, None, reason, {"name": snap.name})
        crash_point("prune.marked")
        self._finish_delete(snap.id, snap.path)

    def _finish_delete(self, snapshot_id: int, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        qemu.fsync_dir(os.path.dirname(path))
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
        snaps = self.snapshots(image)
        sealed = sorted((s for s in snaps if s.sealed), key=lambda s: s.version)
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
            for why in self.usage(s):
                if not why.startswith("it is the parent"):
                    keep_it(s, why)
                    protected.add(s.id)
        groups = {r["target"] for r in self.state.query(
            "SELECT DISTINCT a.target FROM assignments a JOIN images i ON i.id = a.image_id "
            "WHERE i.name = ? AND a.kind = 'current' AND a.status = 'active'", (image,))}
        for g in groups:
            prev = self.previous_for(g, image)
            if prev is not None:
                keep_it(by_id.get(prev.id, prev), "the rollback target of " + ("all groups" if g == ALL_GROUPS
                                                                               else f"group {g}"))
                protected.add(prev.id)
        # everything a protected layer reads through stays too
        for sid in list(protected):
            s = by_id.get(sid)
            while s is not None and s.backing_id is not None:
                parent = by_id.get(s.backing_id)
                if parent is None:
                    break
                if parent.id not in protected:
                    keep_it(parent, f"backing file of {s.name}")
                    protected.add(parent.id)
                s = parent
        victims = [s for s in sealed if s.id not in protected]
        # children first: a layer deeper in the chain goes before the one it reads through
        victims.sort(key=lambda s: -s.depth)
        return victims, kept

    def prune(self, image: str, keep: int, actor: str, reason: str = "", dry_run: bool = False) -> dict:
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
                progress: Callable[[float], None] | None = None) -> dict:
        """Rewrite a sealed snapshot as a standalone layer (same content, no backing file)."""
        snap = self.resolve(ref)
        if snap.state != "sealed":
            raise Refused(f"cannot flatten {snap.name}: it is {snap.state} (only sealed snapshots are flattened)")
        if snap.backing_id is None:
            raise Refused(f"{snap.name} is already standalone (chain depth 1)")
        with self._busy_lock:
            if snap.id in self._busy:
                raise Refused(f"a flatten of {snap.name} is already running")
            self._busy.add(snap.id)
        try:
            need = qemu.measure(snap.path, "qcow2")
            self.check_space(need, f"flatten {snap.name} ({human(need)})")
            crash_point("flatten.before")
            tmp, _final, rel = self._new_file(snap.image)
            try:
                qemu.convert(snap.path, "qcow2", str(tmp), progress)
                crash_point("flatten.converted")
                os.chmod(tmp, 0o444)
                qemu.fsync_file(str(tmp))
                os.rename(tmp, snap.path)  # same content: clients holding the old file keep reading it
                qemu.fsync_dir(os.path.dirname(snap.path))
            except BaseException:
                _unlink_quiet(tmp)
                raise
            finally:
                self._release(rel)
            crash_point("flatten.renamed")
            with self.state.transaction() as cur:
                cur.execute("UPDATE snapshots SET backing_id = NULL WHERE id = ?", (snap.id,))
                self._audit(cur, actor, "flatten", snap.image, snap.id, None, reason,
                            {"old_depth": snap.depth, "bytes": _allocated(snap.path)})
            crash_point("flatten.committed")
        finally:
            with self._busy_lock:
                self._busy.discard(snap.id)
        self._notify("flatten", {"image": snap.image, "snapshot": snap.id})
        return {"snapshot": snap.name, "old_depth": snap.depth, "depth": 1}

    # ------------------------------------------------------------------ fsck
    def purge_lost_found(self, actor: str, reason: str = "") -> list[str]:
        """Delete what fsck set aside in lost+found/ (after the admin has looked at it)."""
        lost = self.root / LOST_FOUND
        removed = sorted(str(p.relative_to(lost)) for p in lost.rglob("*") if p.is_file()) if lost.exists() else []
        if removed:
            shutil.rmtree(lost)
            with self.state.transaction() as cur:
                self._audit(cur, actor, "purge-lost-found", None, None, None, reason, {"files": removed})
        return removed

    def layer_files(self) -> list[str]:
        """Committed-looking layer files on disk (`image/name`), lost+found and temp files left out."""
        return sorted(f"{d.name}/{f.name}" for d in self.root.iterdir() if d.is_dir() and d.name != LOST_FOUND
                      for f in d.iterdir() if f.is_file() and not f.name.startswith(TEMP_PREFIX))

    def refuse_new_database_beside_layers(self) -> None:
        """Raise Refused when the database has never held a snapshot but layer files exist: an empty,
        new or replaced state.db. fsck would take every layer for debris and set it aside in lost+found;
        the admin must decide (restore the database, or move the files away to start empty)."""
        if self.state.query("SELECT 1 FROM snapshots LIMIT 1"):
            return
        files = self.layer_files()
        if not files:
            return
        shown = ", ".join(str(self.root / f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise Refused(f"{self.state.path} holds no snapshot, but {self.root} holds {len(files)} layer file(s): {shown}. "
                      f"The database is new, empty or not the one of these layers; the start-up check would set "
                      f"every layer aside in lost+found. Restore the state database these layers belong to, or "
                      f"move {self.root} aside to really start an empty store (an interrupted first import "
                      f"leaves one such file: move it aside).")

    def fsck(self, repair: bool = True) -> FsckReport:
        """Make the files and the database agree after a crash; report what could not be repaired.

        - `.tmp-*` files are debris of an operation that never committed: removed.
        - a layer file no row names is an operation that did not commit: moved to lost+found/.
        - rows 'deleting' are finished (file unlinked, row 'deleted').
        - a file's mode follows its row (sealed 0444, draft 0644).
        - a row's backing follows the qcow2 header (a flatten renamed the file but did not commit).
        - rows whose file is missing are reported (never dropped: the admin decides).
        - a database without any snapshot beside layer files is refused, nothing moved (see
          refuse_new_database_beside_layers).
        """
        if repair:
            self.refuse_new_database_beside_layers()
        rep = FsckReport()
        rows = self.state.query(self._SNAP_SELECT + "ORDER BY s.id")
        by_file = {r["file"]: r for r in rows}
        file_of = {r["id"]: r["file"] for r in rows}
        for r in rows:
            if r["state"] == "deleting":
                rep.finished_deletes.append(f"{r['image']}#{r['id']}")
                if repair:
                    self._finish_delete(r["id"], str(self.root / r["file"]))
        live = [r for r in rows if r["state"] in ("draft", "sealed")]
        for r in live:
            rep.checked += 1
            path = self.root / r["file"]
            name = f"{r['image']}@v{r['version']}" if r["version"] is not None else f"{r['image']}@draft-{r['id']}"
            if not path.exists():
                rep.problems.append(f"{name}: file {path} is missing")
                continue
            want = 0o444 if r["state"] == "sealed" else 0o644
            mode = path.stat().st_mode & 0o777
            if mode != want:
                rep.fixed_modes.append(f"{name}: mode {mode:o} -> {want:o}")
                if repair:
                    os.chmod(path, want)
            try:
                size, backing = read_qcow2_header(str(path))
            except (OSError, SnapshotError) as exc:
                rep.problems.append(f"{name}: {exc}")
                continue
            if size != r["virtual_size"]:
                rep.problems.append(f"{name}: the file says {size} bytes, the database {r['virtual_size']}")
            want_backing = os.path.basename(file_of[r["backing_id"]]) if r["backing_id"] else None
            if backing != want_backing:
                actual = None
                if backing is not None:
                    rel = f"{r['image']}/{os.path.basename(backing)}"
                    actual = by_file.get(rel)
                if backing is None or actual is not None:
                    rep.fixed_backing.append(f"{name}: backing {want_backing} -> {backing}")
                    if repair:
                        with self.state.transaction() as cur:
                            cur.execute("UPDATE snapshots SET backing_id = ? WHERE id = ?",
                                        (actual["id"] if actual is not None else None, r["id"]))
                else:
                    rep.problems.append(f"{name}: backing file {backing} is not a snapshot of the store")
            elif backing is not None and r["backing_id"] and not (self.root / file_of[r["backing_id"]]).exists():
                rep.problems.append(f"{name}: backing file {backing} is missing")
        # files no row knows
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != LOST_FOUND):
            for f in sorted(d.iterdir()):
                rel = f"{d.name}/{f.name}"
                with self._busy_lock:
                    if rel in self._inflight:
                        continue
                if f.name.startswith(TEMP_PREFIX):
                    rep.removed_temp.append(rel)
                    if repair:
                        _unlink_quiet(f)
                elif rel not in by_file:
                    rep.orphans_moved.append(rel)
                    if repair:
                        dest = self.root / LOST_FOUND / d.name
                        dest.mkdir(parents=True, exist_ok=True)
                        shutil.move(str(f), str(dest / f.name))
                elif by_file[rel]["state"] == "deleted":
                    rep.orphans_moved.append(rel)
                    if repair:
                        _unlink_quiet(f)
        # active assignments on snapshots that are gone
        for r in self.state.query("SELECT a.id, a.kind, a.target, s.state FROM assignments a JOIN snapshots s "
                                  "ON s.id = a.snapshot_id WHERE a.status = 'active' AND s.state = 'deleted'"):
            rep.ended_assignments.append(f"{r['kind']} {r['target']} (assignment {r['id']})")
            if repair:
                with self.state.transaction() as cur:
                    cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = 'fsck' "
                                "WHERE id = ?", (time.time(), r["id"]))
        if repair and not rep.clean:
            with self.state.transaction() as cur:
                self._audit(cur, "fsck", "fsck", None, None, None, "", rep.to_dict())
        return rep


def _unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
