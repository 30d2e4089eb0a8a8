"""What the daemon's services offer each other through `bootd.daemon.Context`, as Protocols.

A service fills its seam at start (`ctx.disks = DiskManager(...)`) and its consumers call only what is
declared here, so a consumer is type-checked against the seam and never probes an object for the
attributes or call style it might have. This module sits under `Service` and `Context`: it imports the
boot plan and the snapshot records (snapshots/model.py), never a service; the concrete types named in the
docstrings implement it (tests/foundation/test_seams.py has mypy check that).
"""
from __future__ import annotations

import builtins
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

from bootd.bootplan import PlannedSnapshot, SnapshotState
from snapshots.model import Assignment, FsckReport, Snapshot

if TYPE_CHECKING:  # types only: the menu model is the menus component's
    import asyncio

    from pxe.menu import BootMenu

SnapshotKey = Union[int, str, PlannedSnapshot]
"""How a disk seam is told which snapshot to export: its id, a file path, or the snapshot itself."""


# -- snapshots (snapshots/store.py SnapshotStore, `ctx.snapshots`) -----------------------------------
Progress = Callable[[float], None]


class Snapshots(SnapshotState[Snapshot], Protocol):
    """The snapshot store as its consumers call it: the planner (`assigned`, `previous_for`), the disks
    (`get`, `register_open_check`), the disk API (`resolve`) and the snapshot admin API (the rest).
    Its records are the plain data classes of snapshots/model.py."""

    depth_warning: int

    def get(self, snapshot_id: int) -> Snapshot:
        """The snapshot with that id (raises the store's NotFound)."""
        ...

    def resolve(self, ref: str | int, image: str | None = None) -> Snapshot:
        """A snapshot from a reference an admin types ("17", "debian@v3", "debian@current", ...)."""
        ...

    def register_open_check(self, fn: Callable[[Snapshot], Iterable[str]]) -> None:
        """`fn(snapshot)` says who has the snapshot's file open (NBD exports): deletes refuse then."""
        ...

    def boot_choice(self, mac: str, group: str | None, image: str) -> tuple[Snapshot | None, str]: ...

    # images
    def images(self) -> list[dict[str, Any]]: ...

    def check_new_image(self, name: str) -> None:
        """Raises SnapshotError when `name` is no valid new image name (before a long import starts)."""
        ...

    def create_image(self, name: str, size: int | str, actor: str, reason: str = "") -> Snapshot: ...

    def import_image(self, name: str, file: str, actor: str, reason: str = "",
                     progress: Progress | None = None, kernel: str | None = None) -> Snapshot: ...

    def history(self, image: str, limit: int = 200) -> dict[str, Any]: ...

    def audit_log(self, image: str | None = None, limit: int = 100, actor: str | None = None,
                  action: str | None = None, target: str | None = None) -> list[dict[str, Any]]: ...

    def prune(self, image: str, keep: int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]: ...

    # snapshots and their lifecycle
    def snapshots(self, image: str | None = None, include_deleted: bool = False) -> Sequence[Snapshot]: ...

    def assignments(self, image: str | None = None, active_only: bool = True) -> Sequence[Assignment]: ...

    def usage(self, snap: Snapshot) -> list[str]: ...

    def draft(self, ref: str | int, actor: str, reason: str = "", host: str | None = None) -> Snapshot: ...

    def seal(self, ref: str | int, note: str, actor: str, reason: str = "", kernel: str | None = None) -> Snapshot: ...

    def set_kernel(self, ref: str | int, kernel: str | None, actor: str, reason: str = "") -> Snapshot:
        """A native image's sealed snapshot: read (another of) its kernels again from its own /boot."""
        ...

    def delete(self, ref: str | int, actor: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]: ...

    def flatten(self, ref: str | int, actor: str, reason: str = "",
                progress: Progress | None = None) -> dict[str, Any]: ...

    # who boots what
    def promote(self, ref: str | int, group: str | None, actor: str, reason: str = "") -> dict[str, Any]: ...

    def rollback(self, image: str, group: str | None, actor: str, reason: str = "") -> dict[str, Any]: ...

    def test(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]: ...

    def pin(self, ref: str | int, host: str, actor: str, reason: str = "") -> dict[str, Any]: ...

    def end_test(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]: ...

    def unpin(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]: ...

    def end_maintenance(self, image: str, host: str, actor: str, reason: str = "") -> dict[str, Any]: ...

    # repair
    def fsck(self, repair: bool = True) -> FsckReport: ...

    def purge_lost_found(self, actor: str, reason: str = "") -> list[str]: ...


class SnapshotJob(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class SnapshotJobs(Protocol):
    """Background snapshot work (imports, flattens): snapshots/jobs.py JobManager, `ctx.snapshot_jobs`."""

    def start(self, kind: str, target: str, actor: str,
              fn: Callable[[Callable[[float], None]], dict[str, Any]]) -> SnapshotJob: ...

    def get(self, job_id: int) -> Optional[SnapshotJob]: ...

    def list(self) -> Sequence[SnapshotJob]: ...


# -- disks over NBD (nbdexport/manager.py DiskManager, `ctx.disks`) ----------------------------------
class DiskExport(Protocol):
    """One NBD export of a host's disk (nbdexport.model.Export)."""

    @property
    def name(self) -> str: ...

    @property
    def uri(self) -> str:
        """nbd://HOST:PORT/NAME (nbds:// with TLS)."""
        ...

    @property
    def format(self) -> str: ...

    @property
    def cmdline(self) -> str:
        """The `bootd.nbd=HOST:PORT/NAME` kernel command line word."""
        ...

    def as_dict(self) -> dict[str, Any]: ...


class DiskSpace(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class StatusReport(Protocol):
    def status(self) -> dict[str, Any]: ...


class Disks(Protocol):
    """Per-host copy-on-write disks exported over NBD: what menus, client configs and the disk API call."""

    @property
    def qsd(self) -> StatusReport:
        """The storage daemon behind the exports."""
        ...

    def export_for(self, mac: str, snapshot: Optional[SnapshotKey] = None) -> Optional[DiskExport]:
        """The current boot's export (of that snapshot; None: the boot's main one), without I/O."""
        ...

    async def prepare_boot(self, mac: str, snapshot: Optional[SnapshotKey] = None,
                           server_ip: Optional[str] = None) -> DiskExport:
        """A new boot: a fresh overlay over `snapshot` (None: what the host's boot plan gives)."""
        ...

    async def prepare_export(self, mac: str, snapshot: SnapshotKey, server_ip: Optional[str] = None) -> DiskExport:
        """One more export in the host's current boot (idempotent)."""
        ...

    async def reset(self, mac: str, dry_run: bool = False) -> dict[str, Any]:
        """Throw the host's disk changes away; dry_run: only say what would go. Never a draft."""
        ...

    async def end_maintenance(self, mac: str, snapshot_id: Optional[int] = None) -> builtins.list[str]:
        """Release the host's export of its maintenance draft (the draft file stays)."""
        ...

    async def commit(self, mac: str, note: str = "", force: bool = False) -> dict[str, Any]: ...

    def space(self) -> DiskSpace: ...

    async def list(self) -> builtins.list[dict[str, Any]]: ...


# -- menus (pxe/booter.py Booter, `ctx.booter`) -------------------------------------------------------
class Booter(Protocol):
    """What a host boots, as a menu with complete kernel command lines."""

    async def menu_for(self, mac: Optional[str], server_ip: Optional[str] = None, *,
                       new_boot: bool = True, preview: bool = False) -> BootMenu: ...


# -- TFTP (bootd/tftp/server.py TftpServer, `ctx.tftp`) ----------------------------------------------
TftpAnswer = Union[bytes, str, None]
TftpProvider = Callable[[str, str, Optional[str]], Union[TftpAnswer, Awaitable[TftpAnswer]]]
"""(path, client IP, client MAC or None) -> the file's bytes, or None to let the next provider answer;
plain or async (bootd/tftp/providers.py awaits what is awaitable)."""


class TftpFiles(Protocol):
    """Where components add the names they generate (menus, client files) to what TFTP serves."""

    def add_provider(self, provider: TftpProvider, pattern: Union[str, re.Pattern[str], None] = None) -> object: ...

    def remove_provider(self, provider: TftpProvider) -> None: ...


ReloadRequest = Callable[[], "asyncio.Task[bool]"]
"""Starts a config reload in a task of its own; the task's result says whether the new config applied."""


class ClusterRole(Protocol):
    """bootd/cluster.py Cluster: this server's name and whether it answers DHCP (several servers on one
    PostgreSQL state); `takeover_listeners` run on the event loop when it takes the DHCP role over."""

    server_name: str
    takeover_listeners: list[Callable[[], None]]
    refresh_listeners: list[Callable[[], None]]

    def dhcp_active(self) -> bool: ...

    def confirm_dhcp(self) -> bool: ...
