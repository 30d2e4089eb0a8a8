"""Changing the snapshot store: images (create, import), drafts (new, adopted from a host's overlay),
seal, promote, rollback, and the per-host test, pin and maintenance assignments, each in one transaction
with its audit entry.

A new layer's file is written and renamed into place before its row is committed (snapshots/files.py);
a seal chmods the file read-only before the row says "sealed"; promote/rollback/test/pin touch rows only.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootd.macaddr import parse_mac
from bootd.units import human

from . import qemu
from .bootfiles import BootFileStore, BootKind, KernelFound, valid_release
from .crash import crash_point
from .errors import Refused, SnapshotError
from .files import LayerFiles, allocated, parse_size, read_qcow2_header, unlink_quiet
from .hooks import StoreHooks
from .model import ALL_GROUPS, Snapshot, valid_image_name
from .queries import SnapshotQueries, fetch_one, inserted_id, name_in

if TYPE_CHECKING:
    from bootd.state import ReplayCursor

MiB = 1024 * 1024
DRAFT_SPACE = 4 * MiB          # a fresh overlay is ~200 KiB; ask for a little room to start writing
DEFAULT_DEPTH_WARNING = 8      # chains deeper than this are flagged: read latency grows with depth


def record_audit(cur: ReplayCursor, actor: str, action: str, image: str | None, snapshot_id: int | None,
                 target: str | None = None, reason: str = "", detail: dict[str, Any] | None = None) -> None:
    """The audit entry of a change, written in the change's own transaction."""
    cur.execute("INSERT INTO audit(at, actor, action, image, snapshot_id, target, reason, detail) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (time.time(), actor or "unknown", action, image, snapshot_id, target, reason or "",
                 json.dumps(detail, sort_keys=True) if detail else None))


def require_host(host: str) -> str:
    mac = parse_mac(host or "")
    if mac is None:
        raise SnapshotError(f"{host!r} is not a MAC address")
    return mac


class SnapshotLifecycle:
    """Every change an admin (or the config) makes to images, snapshots and assignments, except deleting."""

    def __init__(self, queries: SnapshotQueries, files: LayerFiles, hooks: StoreHooks,
                 depth_warning: int = DEFAULT_DEPTH_WARNING):
        self.queries = queries
        self.state = queries.state
        self.files = files
        self.hooks = hooks
        self.depth_warning = int(depth_warning)
        # native images carry their boot files (snapshots/bootfiles.py); the config says which images are
        self.boot_files: BootFileStore | None = None
        self.boot_kind: BootKind = lambda image: None

    def _kernel_wanted(self, image: str, kernel: str | None) -> tuple[bool, str | None]:
        """(native?, the kernel release to take) for `image`; `kernel` is what the admin said now."""
        native = self.boot_kind(image)
        if native is None:
            if kernel:
                raise Refused(f"image {image} boots the config's kernel (kind: client); --kernel is for images "
                              f"that boot their own (kind: native in the config)")
            return False, None
        if kernel is not None and kernel != "latest" and not valid_release(kernel):
            raise SnapshotError(f"{kernel!r} is not a kernel release (like 6.1.0-28-amd64, or latest)")
        if self.boot_files is None:
            raise SnapshotError(f"image {image} is native but this store has no boot root for its kernels",
                                status=500)
        return True, kernel or native.kernel_release

    def _read_boot(self, layer: str, image: str, want: str | None, what: str) -> tuple[Path, KernelFound]:
        assert self.boot_files is not None
        return self.boot_files.read(layer, image, want, what)

    def _place_boot(self, tmp: Path | None, image: str, snapshot_id: int) -> None:
        if tmp is not None and self.boot_files is not None:
            self.boot_files.place(tmp, image, snapshot_id)

    def _discard_boot(self, tmp: Path | None) -> None:
        if tmp is not None and self.boot_files is not None:
            self.boot_files.discard(tmp)

    def _warnings_for(self, snap: Snapshot) -> list[str]:
        if snap.depth > self.depth_warning:
            return [f"{snap.name} has a chain of {snap.depth} layers (more than {self.depth_warning}): reads "
                    f"get slower with every layer; run `bootctl snapshot flatten {snap.name}`"]
        return []

    # ------------------------------------------------------------------ images
    def create_image(self, name: str, size: int | str, actor: str, reason: str = "") -> Snapshot:
        """A new image whose first snapshot (v1) is an empty disk of `size`."""
        size = parse_size(size)
        self.check_new_image(name)
        self.files.check_space(DRAFT_SPACE, f"create image {name}")
        tmp, final, rel = self.files.new_file(name)
        try:
            try:
                qemu.create_empty(str(tmp), size)
                os.chmod(tmp, 0o444)
                self.files.publish(tmp, final)
            except BaseException:
                unlink_quiet(tmp)
                raise
            snap = self._commit_first(name, size, rel, f"empty {human(size)}", actor, reason, "image-create",
                                      "empty disk")
        finally:
            self.files.release(rel)
        self.hooks.notify("image-create", {"image": name, "snapshot": snap.id})
        return snap

    def check_new_image(self, name: str) -> None:
        if not valid_image_name(name):
            raise SnapshotError(f"{name!r} is not a valid image name: 1-63 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit")
        if self.queries.image_exists(name):
            raise Refused(f"image {name} already exists (import into a new name, or draft a new snapshot of it)")

    def _commit_first(self, name: str, size: int, rel: str, source: str, actor: str, reason: str,
                      action: str, note: str, kernel_release: str | None = None) -> Snapshot:
        now = time.time()
        try:
            with self.state.transaction() as cur:
                if cur.execute("SELECT 1 FROM images WHERE name = ?", (name,)).fetchone():
                    raise Refused(f"image {name} already exists")
                cur.execute("INSERT INTO images(name, virtual_size, created_at, created_by, source) VALUES (?,?,?,?,?)",
                            (name, size, now, actor, source))
                image_id = inserted_id(cur)
                cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                            "virtual_size, note, created_at, created_by, sealed_at, sealed_by, kernel_release) "
                            "VALUES (?, 1, 'sealed', NULL, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (image_id, rel, size, note, now, actor, now, actor, kernel_release))
                sid = inserted_id(cur)
                detail: dict[str, Any] = {"source": source, "size": size}
                if kernel_release:
                    detail["kernel"] = kernel_release
                record_audit(cur, actor, action, name, sid, None, reason, detail)
                crash_point("import.in-txn")
        except BaseException:
            unlink_quiet(self.files.root / rel)
            raise
        crash_point("import.committed")
        return self.queries.get(sid)

    def import_image(self, name: str, file: str, actor: str, reason: str = "",
                     progress: Callable[[float], None] | None = None, kernel: str | None = None) -> Snapshot:
        """Import a raw or qcow2 disk image as v1 of a new image (a standalone qcow2 copy). A native image's
        kernel and initramfs are read from the copy before anything is committed: an image without a
        usable kernel is refused whole."""
        self.check_new_image(name)
        native, want = self._kernel_wanted(name, kernel)
        found = qemu.check_importable(file)
        need = qemu.measure(file, found.format)
        self.files.check_space(need, f"import {file} ({human(need)} as qcow2)")
        crash_point("import.before")
        tmp, final, rel = self.files.new_file(name)
        boot: Path | None = None
        try:
            try:
                qemu.convert(file, found.format, str(tmp), progress)
                crash_point("import.converted")
                chosen = None
                if native:
                    boot, chosen = self._read_boot(str(tmp), name, want, f"import of {os.path.basename(file)}")
                os.chmod(tmp, 0o444)
                self.files.publish(tmp, final)
            except BaseException:
                unlink_quiet(tmp)
                self._discard_boot(boot)
                raise
            crash_point("import.renamed")
            try:
                snap = self._commit_first(name, found.virtual_size, rel, os.path.abspath(file), actor, reason,
                                          "image-import", f"imported from {os.path.basename(file)}",
                                          chosen.release if chosen else None)
            except BaseException:
                self._discard_boot(boot)
                raise
            self._place_boot(boot, name, snap.id)
        finally:
            self.files.release(rel)
        self.hooks.notify("image-import", {"image": name, "snapshot": snap.id})
        return snap

    def set_kernel(self, ref: str | int, kernel: str | None, actor: str, reason: str = "") -> Snapshot:
        """Read a sealed snapshot's boot files again (another of its kernels, or files lost from the boot
        root): the snapshot's layer is immutable, only which of its kernels the PCs boot changes."""
        snap = self.queries.resolve(ref)
        if snap.state != "sealed":
            raise Refused(f"{snap.name} is {snap.state}: its kernel is read when it is sealed "
                          f"(bootctl snapshot seal {snap.name} --kernel RELEASE)")
        native, want = self._kernel_wanted(snap.image, kernel)
        if not native:
            raise Refused(f"image {snap.image} boots the config's kernel (kind: client): its snapshots carry none")
        boot, chosen = self._read_boot(snap.path, snap.image, want, snap.name)
        try:
            with self.state.transaction() as cur:
                row = fetch_one(cur, "SELECT state, kernel_release FROM snapshots WHERE id = ?", (snap.id,))
                if row["state"] != "sealed":
                    raise Refused(f"{snap.name} was {row['state']} meanwhile")
                cur.execute("UPDATE snapshots SET kernel_release = ? WHERE id = ?", (chosen.release, snap.id))
                record_audit(cur, actor, "kernel", snap.image, snap.id, None, reason,
                             {"kernel": chosen.release, "was": row["kernel_release"]})
        except BaseException:
            self._discard_boot(boot)
            raise
        self._place_boot(boot, snap.image, snap.id)
        self.hooks.notify("kernel", {"image": snap.image, "snapshot": snap.id, "kernel": chosen.release})
        return self.queries.get(snap.id)

    # ------------------------------------------------------------------ lifecycle
    def draft(self, ref: str | int, actor: str, reason: str = "", host: str | None = None) -> Snapshot:
        """A new writable layer on top of a sealed snapshot; with `host`, that host boots it (writable)."""
        parent = self.queries.resolve(ref)
        if parent.state == "draft":
            raise Refused(f"{parent.name} is a draft: seal it first (bootctl snapshot seal {parent.name}), "
                          f"then draft from the sealed snapshot")
        if parent.state != "sealed":
            raise Refused(f"{parent.name} is {parent.state}: cannot draft from it")
        mac = require_host(host) if host else None
        if not os.path.exists(parent.path):
            raise SnapshotError(f"{parent.name}: its file {parent.path} is missing (run bootctl snapshot fsck)",
                                status=500)
        self.files.check_space(DRAFT_SPACE, f"create a draft of {parent.name}")
        crash_point("draft.before")
        tmp, final, rel = self.files.new_file(parent.image)
        try:
            return self._draft_files(parent, mac, tmp, final, rel, actor, reason)
        finally:
            self.files.release(rel)

    def _draft_files(self, parent: Snapshot, mac: str | None, tmp: Path, final: Path, rel: str, actor: str,
                     reason: str) -> Snapshot:
        try:
            qemu.create_overlay(str(tmp), os.path.basename(parent.path))
            crash_point("draft.file-made")
            self.files.publish(tmp, final)
        except BaseException:
            unlink_quiet(tmp)
            raise
        crash_point("draft.renamed")
        now = time.time()
        try:
            with self.state.transaction() as cur:
                row = cur.execute("SELECT state FROM snapshots WHERE id = ?", (parent.id,)).fetchone()
                if row is None or row["state"] != "sealed":
                    raise Refused(f"{parent.name} was {row['state'] if row else 'removed'} meanwhile: "
                                  f"cannot draft from it")
                cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                            "virtual_size, note, created_at, created_by) "
                            "VALUES (?, NULL, 'draft', ?, ?, ?, ?, '', ?, ?)",
                            (parent.image_id, parent.id, parent.id, rel, parent.virtual_size, now, actor))
                sid = inserted_id(cur)
                if mac:
                    self._assign(cur, parent.image_id, "maintenance", mac, sid, actor, reason, now)
                record_audit(cur, actor, "draft", parent.image, sid, mac, reason, {"parent": parent.name})
        except BaseException:
            unlink_quiet(final)
            raise
        crash_point("draft.committed")
        snap = self.queries.get(sid)
        self.hooks.notify("draft", {"image": snap.image, "snapshot": sid, "host": mac})
        return snap

    def draft_from_layer(self, snapshot_id: int, layer_path: str, note: str = "", actor: str = "bootd",
                         reason: str = "", remove_source: bool = True) -> Snapshot:
        """Adopt a qcow2 layer whose backing file is snapshot `snapshot_id` (e.g. a host's disk overlay, after
        its export is closed) as a new draft of that image. The layer is copied in (temp name, fsync,
        rename, row), and the source removed only after the row is committed: a crash loses nothing."""
        parent = self.queries.get(snapshot_id)
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
        self.files.check_space(allocated(src), f"adopt {os.path.basename(src)} as a draft of {parent.name}")
        tmp, final, rel = self.files.new_file(parent.image)
        try:
            try:
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", src, str(tmp)], check=True,
                               capture_output=True, text=True)
                os.chmod(tmp, 0o644)
                qemu.rebase_unsafe(str(tmp), os.path.basename(parent.path))
                self.files.publish(tmp, final)
            except subprocess.CalledProcessError as exc:
                unlink_quiet(tmp)
                raise SnapshotError(f"cannot copy {src}: {exc.stderr.strip()}", status=500) from exc
            except BaseException:
                unlink_quiet(tmp)
                raise
            now = time.time()
            try:
                with self.state.transaction() as cur:
                    cur.execute("INSERT INTO snapshots(image_id, version, state, parent_id, backing_id, file, "
                                "virtual_size, note, created_at, created_by) "
                                "VALUES (?, NULL, 'draft', ?, ?, ?, ?, ?, ?, ?)",
                                (parent.image_id, parent.id, parent.id, rel, parent.virtual_size, note or "", now,
                                 actor))
                    sid = inserted_id(cur)
                    record_audit(cur, actor, "adopt-layer", parent.image, sid, None, reason,
                                 {"parent": parent.name, "source": src})
            except BaseException:
                unlink_quiet(final)
                raise
        finally:
            self.files.release(rel)
        if remove_source:
            unlink_quiet(src)
        snap = self.queries.get(sid)
        self.hooks.notify("draft", {"image": snap.image, "snapshot": sid, "source": src})
        return snap

    def _assign(self, cur: ReplayCursor, image_id: int, kind: str, target: str, snapshot_id: int, actor: str,
                reason: str, now: float, end_status: str = "ended") -> int | None:
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

    def seal(self, ref: str | int, note: str, actor: str, reason: str = "", kernel: str | None = None) -> Snapshot:
        """The draft becomes an immutable snapshot: next version number, its note, file read-only. A native
        image's draft gets its kernel and initramfs read from its own /boot first: a draft without a usable
        kernel stays a draft, with the error saying why."""
        snap = self.queries.resolve(ref)
        if snap.state != "draft":
            raise Refused(f"{snap.name} is {snap.state}, not a draft: only drafts can be sealed")
        holders = self.hooks.open_by(snap)
        if holders:
            raise Refused(f"cannot seal {snap.name}: it is open by a client ({'; '.join(holders)}); "
                          f"shut the maintenance host down first")
        if not os.path.exists(snap.path):
            raise SnapshotError(f"{snap.name}: its file is missing (run bootctl snapshot fsck)", status=500)
        qemu.check(snap.path)
        native, want = self._kernel_wanted(snap.image, kernel)
        boot: Path | None = None
        chosen: KernelFound | None = None
        if native:
            boot, chosen = self._read_boot(snap.path, snap.image, want, f"seal of {snap.name}")
        crash_point("seal.before")
        try:
            os.chmod(snap.path, 0o444)
        except BaseException:
            self._discard_boot(boot)
            raise
        crash_point("seal.chmod-done")
        now = time.time()
        try:
            with self.state.transaction() as cur:
                row = fetch_one(cur, "SELECT state FROM snapshots WHERE id = ?", (snap.id,))
                if row["state"] != "draft":
                    raise Refused(f"{snap.name} was {row['state']} meanwhile")
                version = fetch_one(cur, "SELECT COALESCE(MAX(version), 0) + 1 FROM snapshots WHERE image_id = ?",
                                    (snap.image_id,))[0]
                cur.execute("UPDATE snapshots SET state = 'sealed', version = ?, note = ?, sealed_at = ?, "
                            "sealed_by = ?, kernel_release = ? WHERE id = ?",
                            (version, note or "", now, actor, chosen.release if chosen else None, snap.id))
                cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = ? "
                            "WHERE snapshot_id = ? AND kind = 'maintenance' AND status = 'active'",
                            (now, actor, snap.id))
                detail: dict[str, Any] = {"version": version, "note": note or "", "draft": snap.name}
                if chosen:
                    detail["kernel"] = chosen.release
                record_audit(cur, actor, "seal", snap.image, snap.id, None, reason, detail)
                crash_point("seal.in-txn")
        except BaseException:
            self._discard_boot(boot)
            if self.queries.get(snap.id).state == "draft":
                os.chmod(snap.path, 0o644)
            raise
        crash_point("seal.committed")
        self._place_boot(boot, snap.image, snap.id)
        sealed = self.queries.get(snap.id)
        self.hooks.notify("seal", {"image": sealed.image, "snapshot": sealed.id, "version": sealed.version})
        return sealed

    def _require_bootable(self, snap: Snapshot, what: str) -> None:
        if snap.state == "draft":
            raise Refused(f"cannot {what} {snap.name}: it is a draft; seal it first "
                          f"(bootctl snapshot seal {snap.name} -m NOTE)")
        if snap.state != "sealed":
            raise Refused(f"cannot {what} {snap.name}: it is {snap.state}")

    @staticmethod
    def _host_overrides(cur: ReplayCursor, image_id: int) -> list[dict[str, Any]]:
        """Hosts whose test or pin of the image outlives a promote or rollback (they keep booting their own
        snapshot): named in its answer so nobody believes a whole room moved."""
        rows = cur.execute("SELECT a.kind, a.target, a.snapshot_id FROM assignments a WHERE a.image_id = ? "
                           "AND a.kind IN ('test', 'pin') AND a.status = 'active' ORDER BY a.target, a.kind",
                           (image_id,)).fetchall()
        return [{"host": r["target"], "kind": r["kind"], "snapshot": name_in(cur, r["snapshot_id"])} for r in rows]

    def promote(self, ref: str | int, group: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        """Make a sealed snapshot current for `group` (None/'*' = all groups); the previous one is remembered."""
        snap = self.queries.resolve(ref)
        self._require_bootable(snap, "promote")
        target = group or ALL_GROUPS
        where = "all groups" if target == ALL_GROUPS else f"group {target}"
        crash_point("promote.before")
        now = time.time()
        with self.state.transaction() as cur:
            row = fetch_one(cur, "SELECT state FROM snapshots WHERE id = ?", (snap.id,))
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
            previous = name_in(cur, old["snapshot_id"]) if old is not None else None
            record_audit(cur, actor, "promote", snap.image, snap.id, target, reason, {"previous": previous})
            overrides = self._host_overrides(cur, snap.image_id)
        crash_point("promote.committed")
        self.hooks.notify("promote", {"image": snap.image, "snapshot": snap.id, "group": target})
        return {"image": snap.image, "group": target, "current": snap.name, "previous": previous,
                "warnings": self._warnings_for(snap), "hosts_not_following": overrides}

    def rollback(self, image: str, group: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        """Make the previously promoted snapshot current again; repeated rollbacks walk back the history."""
        img = self.queries.image_row(image)
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
            if back is not None:
                new_id = back["snapshot_id"]
            elif fallback is not None:
                new_id = fallback["snapshot_id"]
            else:
                raise Refused(f"nothing to roll back to: {name_in(cur, top['snapshot_id'])} is the first "
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
            left = name_in(cur, top["snapshot_id"])
            now_current = name_in(cur, new_id)
            record_audit(cur, actor, "rollback", image, new_id, target, reason,
                         {"from": left, "to": now_current, "follows_all_groups": back is None})
            overrides = self._host_overrides(cur, img["id"])
        crash_point("rollback.committed")
        self.hooks.notify("rollback", {"image": image, "snapshot": new_id, "group": target})
        return {"image": image, "group": target, "current": now_current, "rolled_back": left,
                "follows_all_groups": back is None, "hosts_not_following": overrides,
                "previous": (p.name if (p := self.queries.previous_for(target, image)) else None)}

    def _host_assign(self, kind: str, ref: str | int, host: str, actor: str, reason: str) -> dict[str, Any]:
        snap = self.queries.resolve(ref)
        self._require_bootable(snap, "test" if kind == "test" else "pin")
        mac = require_host(host)
        now = time.time()
        with self.state.transaction() as cur:
            row = fetch_one(cur, "SELECT state FROM snapshots WHERE id = ?", (snap.id,))
            if row["state"] != "sealed":
                raise Refused(f"cannot {kind} {snap.name}: it is {row['state']}")
            old = cur.execute("SELECT snapshot_id FROM assignments WHERE image_id = ? AND kind = ? AND target = ? "
                              "AND status = 'active'", (snap.image_id, kind, mac)).fetchone()
            if old is not None and old["snapshot_id"] == snap.id:
                raise Refused(f"host {mac} is already {'testing' if kind == 'test' else 'pinned to'} {snap.name}")
            previous = name_in(cur, old["snapshot_id"]) if old is not None else None
            self._assign(cur, snap.image_id, kind, mac, snap.id, actor, reason, now)
            record_audit(cur, actor, kind, snap.image, snap.id, mac, reason, {"previous": previous})
        self.hooks.notify(kind, {"image": snap.image, "snapshot": snap.id, "host": mac})
        return {"image": snap.image, "host": mac, kind: snap.name, "previous": previous}

    def _host_unassign(self, kind: str, image: str, host: str, actor: str, reason: str) -> dict[str, Any]:
        img = self.queries.image_row(image)
        mac = require_host(host)
        now = time.time()
        with self.state.transaction() as cur:
            old = cur.execute("SELECT id, snapshot_id FROM assignments WHERE image_id = ? AND kind = ? AND target = ? "
                              "AND status = 'active'", (img["id"], kind, mac)).fetchone()
            if old is None:
                what = {"pin": "pinned to", "test": "testing", "maintenance": "booting a draft of"}[kind]
                raise Refused(f"host {mac} is not {what} any snapshot of image {image}")
            cur.execute("UPDATE assignments SET status = 'ended', ended_at = ?, ended_by = ? WHERE id = ?",
                        (now, actor, old["id"]))
            name = name_in(cur, old["snapshot_id"])
            record_audit(cur, actor, f"un{kind}" if kind != "test" else "end-test", image, old["snapshot_id"], mac,
                         reason)
        self.hooks.notify(f"un{kind}", {"image": image, "host": mac})
        return {"image": image, "host": mac, "ended": name, "snapshot_id": old["snapshot_id"]}

    def test(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        """Boot a sealed snapshot on one host only, to try it before promoting it."""
        return self._host_assign("test", ref, host, actor, reason)

    def end_test(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._host_unassign("test", image, host, actor, reason)

    def pin(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        """The host boots this snapshot whatever its group's current is."""
        return self._host_assign("pin", ref, host, actor, reason)

    def unpin(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._host_unassign("pin", image, host, actor, reason)

    def end_maintenance(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._host_unassign("maintenance", image, host, actor, reason)
