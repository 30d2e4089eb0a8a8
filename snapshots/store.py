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

This class is the one object the rest of bootd holds (`ctx.snapshots`); it composes the parts, each
with one job, and forwards to them:

- snapshots/queries.py   SnapshotQueries    reads, references, the state the boot plan decides from
- snapshots/lifecycle.py SnapshotLifecycle  import, draft, seal, promote, rollback, test/pin/maintenance
- snapshots/prune.py     SnapshotPruner     delete, prune, flatten
- snapshots/fsck.py      StoreCheck         the start-up consistency check and its repairs
- snapshots/files.py     LayerFiles         layer files, free-space reserve, operations under way (no SQL)
- snapshots/hooks.py     StoreHooks         open checks (NBD exports) and change listeners
- snapshots/bootfiles.py BootFileStore      a native image's kernel and initramfs, per snapshot

Every method is synchronous and safe to call from a worker thread (StateStore serialises the
connection); the HTTP API runs them with asyncio.to_thread.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bootfiles import BootFileStore, BootKind
from .files import LayerFiles
from .fsck import StoreCheck
from .hooks import Listener, OpenCheck, StoreHooks
from .lifecycle import DEFAULT_DEPTH_WARNING, SnapshotLifecycle
from .model import ALL_GROUPS, Assignment, FsckReport, Snapshot
from .prune import SnapshotPruner
from .queries import SnapshotQueries

if TYPE_CHECKING:
    from bootd.state import StateStore

Progress = Callable[[float], None]


class SnapshotStore:
    """The images, their snapshots and their assignments; see the module docstring for the file rules."""

    def __init__(self, state: StateStore, root: str | Path, min_free_bytes: int = 0,
                 depth_warning: int = DEFAULT_DEPTH_WARNING, boot_root: str | Path | None = None):
        self.state = state
        self.files = LayerFiles(root, min_free_bytes)
        self.hooks = StoreHooks()
        self.queries = SnapshotQueries(state, self.files, self.hooks)
        self.lifecycle = SnapshotLifecycle(self.queries, self.files, self.hooks, depth_warning)
        self.pruner = SnapshotPruner(self.queries, self.files, self.hooks)
        self.check = StoreCheck(self.queries, self.files, self.pruner)
        self.boot_files = BootFileStore(boot_root) if boot_root is not None else None
        self.lifecycle.boot_files = self.pruner.boot_files = self.queries.boot_files = self.check.boot_files = \
            self.boot_files

    # ------------------------------------------------------------------ settings
    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def min_free_bytes(self) -> int:
        """Free space every write leaves (storage.min_free_mb); a reload changes it."""
        return self.files.min_free_bytes

    @min_free_bytes.setter
    def min_free_bytes(self, value: int) -> None:
        self.files.min_free_bytes = int(value)

    @property
    def depth_warning(self) -> int:
        """Chains deeper than this get a warning (reads slow down with every layer)."""
        return self.lifecycle.depth_warning

    @depth_warning.setter
    def depth_warning(self, value: int) -> None:
        self.lifecycle.depth_warning = int(value)

    @property
    def boot_kind(self) -> BootKind:
        """image name -> NativeBoot when its snapshots carry their own kernel (the config's `kind: native`)."""
        return self.lifecycle.boot_kind

    @boot_kind.setter
    def boot_kind(self, fn: BootKind) -> None:
        self.lifecycle.boot_kind = fn

    def boot_dir_for(self, snapshot_id: int) -> str | None:
        """The boot files a snapshot boots: its own, or for a draft its nearest ancestor's."""
        return self.queries.boot_dir_for(snapshot_id)

    # ------------------------------------------------------------------ hooks for other components
    def register_open_check(self, fn: OpenCheck) -> None:
        """fn(snapshot) -> descriptions of whoever has the snapshot's file open (NBD exports)."""
        self.hooks.register_open_check(fn)

    def open_by(self, snap: Snapshot) -> list[str]:
        return self.hooks.open_by(snap)

    def is_open(self, snap: Snapshot) -> bool:
        return bool(self.hooks.open_by(snap))

    def add_listener(self, fn: Listener) -> None:
        self.hooks.add_listener(fn)

    # ------------------------------------------------------------------ reading (snapshots/queries.py)
    def get(self, snapshot_id: int) -> Snapshot:
        return self.queries.get(snapshot_id)

    def snapshot_path(self, snapshot_id: int) -> str:
        """Absolute path of a snapshot's qcow2 file (for the NBD engine)."""
        return self.queries.get(snapshot_id).path

    def images(self) -> list[dict[str, Any]]:
        return self.queries.images()

    def snapshots(self, image: str | None = None, include_deleted: bool = False) -> list[Snapshot]:
        return self.queries.snapshots(image, include_deleted)

    def resolve(self, ref: str | int, image: str | None = None) -> Snapshot:
        """A snapshot from "17", "debian@v3", "debian@draft-17", "debian@current", "debian@latest", "debian"."""
        return self.queries.resolve(ref, image)

    def assignments(self, image: str | None = None, active_only: bool = True) -> list[Assignment]:
        return self.queries.assignments(image, active_only)

    def current(self, image: str, group: str | None = ALL_GROUPS) -> Snapshot | None:
        """The snapshot promoted for exactly this group (None if that group has no promotion of its own)."""
        return self.queries.current(image, group)

    def assigned(self, image: str, kind: str, target: str) -> Snapshot | None:
        """The snapshot of the active `kind` assignment of `image` to `target` (bootd.bootplan's SnapshotState)."""
        return self.queries.assigned(image, kind, target)

    def previous_for(self, group: str | None, image: str) -> Snapshot | None:
        """The snapshot a rollback of (image, group) would make current, if any."""
        return self.queries.previous_for(group, image)

    def resolve_for_host(self, mac: str, group: str | None, image: str) -> Snapshot | None:
        """What `mac` boots of `image`: the boot plan's rule (bootd.bootplan.snapshot_choice)."""
        return self.queries.resolve_for_host(mac, group, image)

    def boot_choice(self, mac: str, group: str | None, image: str) -> tuple[Snapshot | None, str]:
        """Like resolve_for_host, plus why: 'maintenance', 'pinned', 'test', 'group GROUP', 'all groups'."""
        return self.queries.boot_choice(mac, group, image)

    def usage(self, snap: Snapshot) -> list[str]:
        """Why a snapshot may not be deleted: current, pinned, in test, maintenance, parent, open."""
        return self.queries.usage(snap)

    def audit_log(self, image: str | None = None, limit: int = 100, actor: str | None = None,
                  action: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
        return self.queries.audit_log(image, limit, actor, action, target)

    def history(self, image: str, limit: int = 200) -> dict[str, Any]:
        return self.queries.history(image, limit)

    def free_bytes(self) -> int:
        return self.files.free_bytes()

    def check_space(self, need: int, what: str) -> None:
        """Refuse a write that would leave less than the reserve free (storage.min_free_mb)."""
        self.files.check_space(need, what)

    # ------------------------------------------------------------------ changes (snapshots/lifecycle.py)
    def check_new_image(self, name: str) -> None:
        self.lifecycle.check_new_image(name)

    def create_image(self, name: str, size: int | str, actor: str, reason: str = "") -> Snapshot:
        return self.lifecycle.create_image(name, size, actor, reason)

    def import_image(self, name: str, file: str, actor: str, reason: str = "",
                     progress: Progress | None = None, kernel: str | None = None) -> Snapshot:
        return self.lifecycle.import_image(name, file, actor, reason, progress, kernel)

    def set_kernel(self, ref: str | int, kernel: str | None, actor: str, reason: str = "") -> Snapshot:
        return self.lifecycle.set_kernel(ref, kernel, actor, reason)

    def draft(self, ref: str | int, actor: str, reason: str = "", host: str | None = None) -> Snapshot:
        return self.lifecycle.draft(ref, actor, reason, host)

    def draft_from_layer(self, snapshot_id: int, layer_path: str, note: str = "", actor: str = "bootd",
                         reason: str = "", remove_source: bool = True) -> Snapshot:
        return self.lifecycle.draft_from_layer(snapshot_id, layer_path, note, actor, reason, remove_source)

    def seal(self, ref: str | int, note: str, actor: str, reason: str = "", kernel: str | None = None) -> Snapshot:
        return self.lifecycle.seal(ref, note, actor, reason, kernel)

    def promote(self, ref: str | int, group: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.promote(ref, group, actor, reason)

    def rollback(self, image: str, group: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.rollback(image, group, actor, reason)

    def test(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.test(ref, host, actor, reason)

    def end_test(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.end_test(image, host, actor, reason)

    def pin(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.pin(ref, host, actor, reason)

    def unpin(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.unpin(image, host, actor, reason)

    def end_maintenance(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self.lifecycle.end_maintenance(image, host, actor, reason)

    # ------------------------------------------------------------------ removing (snapshots/prune.py)
    def delete(self, ref: str | int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]:
        return self.pruner.delete(ref, actor, reason, dry_run)

    def prune_plan(self, image: str, keep: int) -> tuple[list[Snapshot], dict[str, list[str]]]:
        return self.pruner.prune_plan(image, keep)

    def prune(self, image: str, keep: int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]:
        return self.pruner.prune(image, keep, actor, reason, dry_run)

    def flatten(self, ref: str | int, actor: str, reason: str = "",
                progress: Progress | None = None) -> dict[str, Any]:
        return self.pruner.flatten(ref, actor, reason, progress)

    # ------------------------------------------------------------------ consistency (snapshots/fsck.py)
    def purge_lost_found(self, actor: str, reason: str = "") -> list[str]:
        return self.check.purge_lost_found(actor, reason)

    def layer_files(self) -> list[str]:
        return self.check.layer_files()

    def refuse_new_database_beside_layers(self) -> None:
        self.check.refuse_new_database_beside_layers()

    def fsck(self, repair: bool = True) -> FsckReport:
        return self.check.fsck(repair)
