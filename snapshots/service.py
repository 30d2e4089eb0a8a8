"""SnapshotService: opens the snapshot store at start-up, reconciles it with fsck, and offers it as
`ctx.snapshots` (plus the background job runner as `ctx.snapshot_jobs`)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bootd.service import Service

from .bootfiles import BootKind, NativeBoot
from .jobs import JobManager
from .store import SnapshotStore

if TYPE_CHECKING:
    from bootd.config import Config, ImageConfig
    from bootd.daemon import Context

log = logging.getLogger("bootd.snapshots")
MiB = 1024 * 1024


def _boot_kinds(cfg: Config) -> BootKind:
    """The config's answer to "does this image carry its own kernel" (kind: native), read at each call so
    a reload changes it."""
    native = {img.name: NativeBoot(img.kernel_release) for img in cfg.images if img.kind == "native"}
    return native.get


SHARED_STORE_GRACE = 3600.0  # seconds fsck leaves an unknown layer file alone when servers share the store


class SnapshotService(Service):
    name = "snapshots"

    def __init__(self) -> None:
        self.store: SnapshotStore | None = None
        self.jobs = JobManager()
        self.last_fsck: dict[str, Any] | None = None

    async def start(self, ctx: Context) -> None:
        cfg = ctx.config
        store = SnapshotStore(ctx.store, cfg.snapshots_dir, min_free_bytes=cfg.storage.min_free_mb * MiB,
                              boot_root=cfg.boot_root)
        store.boot_kind = _boot_kinds(cfg)
        if ctx.store.dialect != "sqlite":  # several servers may share the layer directory: at start-up only
            store.check.recent_grace = SHARED_STORE_GRACE  # (an admin's `bootctl snapshot fsck` repairs at once)
        self.store = store
        try:
            report = await asyncio.to_thread(store.fsck, True)
        finally:
            store.check.recent_grace = 0.0
        self.last_fsck = report.to_dict()
        if report.clean:
            log.info("snapshot store %s: %d layers, files and database agree", store.root, report.checked)
        else:
            for what, items in (("removed temp file", report.removed_temp),
                                ("moved unreferenced file to lost+found", report.orphans_moved),
                                ("finished interrupted delete of", report.finished_deletes),
                                ("fixed file mode", report.fixed_modes),
                                ("fixed backing after interrupted flatten", report.fixed_backing),
                                ("ended assignment of deleted snapshot", report.ended_assignments)):
                for item in items:
                    log.warning("snapshot fsck: %s %s", what, item)
            for p in report.problems:
                log.error("snapshot fsck: %s", p)
        metrics = ctx.metrics

        def on_change(event: str, detail: dict[str, Any]) -> None:
            metrics.inc("snapshots", event)
            log.info("snapshot %s: %s", event, ", ".join(f"{k}={v}" for k, v in sorted(detail.items())))
        store.add_listener(on_change)
        ctx.snapshots = store
        ctx.snapshot_jobs = self.jobs
        self._import_configured(ctx, store)

    def _import_configured(self, ctx: Context, store: SnapshotStore) -> None:
        """Config images with a `disk:` and no snapshot yet get it imported as v1, in the background."""
        known = {r["name"] for r in store.images()}
        for img in ctx.config.images:
            if img.disk and img.name not in known and not any(
                    j.kind == "import" and j.target == img.name for j in self.jobs.running()):
                log.info("importing %s for image %s (from the config)", img.disk, img.name)
                self.jobs.start("import", img.name, "bootd (config)", self._importer(store, img, img.disk))

    def _importer(self, store: SnapshotStore, img: ImageConfig,
                  disk: str) -> Callable[[Callable[[float], None]], dict[str, Any]]:
        """The job that imports `img` from `disk` (its config's `disk:`)."""
        return lambda progress: self._import_and_serve(store, img, disk, progress)

    @staticmethod
    def _import_and_serve(store: SnapshotStore, img: ImageConfig, disk: str,
                          progress: Callable[[float], None]) -> dict[str, Any]:
        """Import a config image as v1 and, when the image has no current snapshot anywhere yet, make
        v1 current for all groups: a freshly configured room boots without an admin step."""
        snap = store.import_image(img.name, disk, "bootd (config)", "image listed in the config", progress)
        # (a native image's kernel is read inside import_image: kind and kernel_release come from the config)
        if store.current(img.name) is None:
            try:
                store.promote(snap.id, None, "bootd (config)", "first snapshot of an image listed in the config")
            except Exception as e:  # someone promoted meanwhile: theirs wins
                log.info("not making %s current for all groups: %s", snap.name, e)
        return snap.to_dict()

    async def stop(self) -> None:
        await asyncio.to_thread(self.jobs.cancel_all, 3.0)

    async def reload(self, ctx: Context) -> None:
        if self.store is not None:
            self.store.min_free_bytes = ctx.config.storage.min_free_mb * MiB
            self.store.boot_kind = _boot_kinds(ctx.config)
            ctx.snapshots = self.store
            self._import_configured(ctx, self.store)

    def status(self) -> dict[str, Any]:
        if self.store is None:
            return {}
        running = self.jobs.running()
        return {"root": str(self.store.root), "images": len(self.store.images()),
                "jobs_running": len(running), "fsck_clean": bool(self.last_fsck and self.last_fsck["clean"])}
