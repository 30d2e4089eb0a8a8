"""The snapshot store's start-up check: make the files and the database agree after a crash, set aside
what no row names, and refuse outright when the database is new but layer files exist.

Each repair follows the ordering the other parts keep (snapshots/store.py): a temp file or a file no row
names is an operation that never committed; a 'deleting' row is a delete to finish; a file's mode and
backing are made to follow its row, or its row the file where a flatten renamed first.
"""
from __future__ import annotations

import os
import shutil
import time

from .bootfiles import BootFileStore
from .errors import Refused, SnapshotError
from .files import LOST_FOUND, TEMP_PREFIX, LayerFiles, read_qcow2_header, unlink_quiet
from .lifecycle import record_audit
from .model import FsckReport
from .prune import SnapshotPruner
from .queries import SnapshotQueries


class StoreCheck:
    """fsck of the store, and the clean-up of what it set aside (lost+found)."""

    def __init__(self, queries: SnapshotQueries, files: LayerFiles, pruner: SnapshotPruner):
        self.queries = queries
        self.state = queries.state
        self.files = files
        self.pruner = pruner
        self.boot_files: BootFileStore | None = None  # native images' kernels (snapshots/bootfiles.py)
        # seconds during which a file no row names is left alone: with several servers on one store
        # (PostgreSQL state, a shared storage.snapshots) it may be another server's operation under way
        self.recent_grace = 0.0

    def purge_lost_found(self, actor: str, reason: str = "") -> list[str]:
        """Delete what fsck set aside in lost+found/ (after the admin has looked at it)."""
        lost = self.files.root / LOST_FOUND
        removed = sorted(str(p.relative_to(lost)) for p in lost.rglob("*") if p.is_file()) if lost.exists() else []
        if removed:
            shutil.rmtree(lost)
            with self.state.transaction() as cur:
                record_audit(cur, actor, "purge-lost-found", None, None, None, reason, {"files": removed})
        return removed

    def layer_files(self) -> list[str]:
        """Committed-looking layer files on disk (`image/name`), lost+found and temp files left out."""
        root = self.files.root
        return sorted(f"{d.name}/{f.name}" for d in root.iterdir() if d.is_dir() and d.name != LOST_FOUND
                      for f in d.iterdir() if f.is_file() and not f.name.startswith(TEMP_PREFIX))

    def refuse_new_database_beside_layers(self) -> None:
        """Raise Refused when the database has never held a snapshot but layer files exist: an empty,
        new or replaced state.db. fsck would take every layer for debris and set it aside in lost+found;
        the admin must decide (restore the database, or move the files away to start empty)."""
        if self.queries.has_snapshot_rows():
            return
        files = self.layer_files()
        if not files:
            return
        root = self.files.root
        shown = ", ".join(str(root / f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise Refused(f"{self.state.location} holds no snapshot, but {root} holds {len(files)} layer file(s): {shown}. "
                      f"The database is new, empty or not the one of these layers; the start-up check would set "
                      f"every layer aside in lost+found. Restore the state database these layers belong to, or "
                      f"move {root} aside to really start an empty store (an interrupted first import "
                      f"leaves one such file: move it aside).")

    def fsck(self, repair: bool = True) -> FsckReport:
        """Make the files and the database agree after a crash; report what could not be repaired.

        - `.tmp-*` files are debris of an operation that never committed: removed.
        - a layer file no row names is an operation that did not commit: moved to lost+found/.
        - rows 'deleting' are finished (file unlinked, row 'deleted').
        - a file's mode follows its row (sealed 0444, draft 0644).
        - a row's backing follows the qcow2 header (a flatten renamed the file but did not commit).
        - rows whose file is missing are reported (never dropped: the admin decides).
        - native snapshots' kernel directories: debris and those of gone snapshots removed, missing ones
          reported (the layer still has them: `bootctl snapshot kernel`).
        - a database without any snapshot beside layer files is refused, nothing moved (see
          refuse_new_database_beside_layers).
        """
        if repair:
            self.refuse_new_database_beside_layers()
        rep = FsckReport()
        rows = self.queries.all_rows()
        by_file = {r["file"]: r for r in rows}
        file_of = {r["id"]: r["file"] for r in rows}
        for r in rows:
            if r["state"] == "deleting":
                rep.finished_deletes.append(f"{r['image']}#{r['id']}")
                if repair:
                    self.pruner.finish_delete(r["id"], str(self.files.root / r["file"]))
        live = [r for r in rows if r["state"] in ("draft", "sealed")]
        for r in live:
            rep.checked += 1
            path = self.files.root / r["file"]
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
            elif backing is not None and r["backing_id"] and not (self.files.root / file_of[r["backing_id"]]).exists():
                rep.problems.append(f"{name}: backing file {backing} is missing")
        # files no row knows
        for d in sorted(p for p in self.files.root.iterdir() if p.is_dir() and p.name != LOST_FOUND):
            for f in sorted(d.iterdir()):
                rel = f"{d.name}/{f.name}"
                if self.files.is_inflight(rel):
                    continue
                if (f.name.startswith(TEMP_PREFIX) or rel not in by_file) and self.recent_grace > 0 and \
                        time.time() - f.stat().st_mtime < self.recent_grace:
                    rep.left_recent.append(rel)  # another server's import, draft or flatten: not debris yet
                    continue
                if f.name.startswith(TEMP_PREFIX):
                    rep.removed_temp.append(rel)
                    if repair:
                        unlink_quiet(f)
                elif rel not in by_file:
                    rep.orphans_moved.append(rel)
                    if repair:
                        dest = self.files.root / LOST_FOUND / d.name
                        dest.mkdir(parents=True, exist_ok=True)
                        shutil.move(str(f), str(dest / f.name))
                elif by_file[rel]["state"] == "deleted":
                    rep.orphans_moved.append(rel)
                    if repair:
                        unlink_quiet(f)
        # active assignments on snapshots that are gone
        for r in self.queries.deleted_with_active_assignments():
            rep.ended_assignments.append(f"{r['kind']} {r['target']} (assignment {r['id']})")
            if repair:
                with self.state.transaction() as cur:
                    cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = 'fsck' "
                                "WHERE id = ?", (time.time(), r["id"]))
        if repair and not rep.clean:
            with self.state.transaction() as cur:
                record_audit(cur, "fsck", "fsck", None, None, None, "", rep.to_dict())
        if self.boot_files is not None:
            self._fsck_boot_files(self.boot_files, rep, repair)
        return rep

    def _fsck_boot_files(self, boot: BootFileStore, report: FsckReport, repair: bool) -> None:
        for d in boot.debris():
            if repair:
                boot.discard(d)
            report.removed_temp.append(str(d))
        live = {(s.image, s.id): s for s in self.queries.snapshots(None, include_deleted=False)}
        for image, sid in boot.known_dirs():
            if (image, sid) not in live or live[(image, sid)].kernel_release is None:
                if repair:
                    boot.remove(image, sid)
                report.finished_deletes.append(f"kernel files {boot.rel_dir(image, sid)}")
        for snap in live.values():
            if snap.kernel_release and not boot.present(snap.image, snap.id):
                report.problems.append(f"{snap.name}: its kernel {snap.kernel_release} is missing from "
                                       f"{boot.dir_of(snap.image, snap.id)}; read it again from the snapshot: "
                                       f"bootctl snapshot kernel {snap.name} --kernel {snap.kernel_release}")
