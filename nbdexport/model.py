"""What the disk engine's parts share: its settings, the snapshot an overlay sits on, one export's row,
and the Export a menu renders into a kernel command line."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from bootd.macaddr import normalize_mac
from nbdexport.check import ClientTls
from nbdexport.errors import DiskError


def norm_mac(mac: str) -> str:
    """bootd.macaddr.normalize_mac, as a DiskError (HTTP 400) when it is not a MAC."""
    try:
        return normalize_mac(mac)
    except ValueError:
        raise DiskError(f"not a MAC address: {mac!r}", status=400) from None


@dataclass(frozen=True)
class SnapshotRef:
    """What an overlay sits on: a snapshot of the store (id set) or a bare qcow2 file (tests, tools)."""

    key: str
    name: str
    path: str
    id: Optional[int] = None
    draft: bool = False  # a writable draft of the snapshot store: exported as is, no overlay

    @classmethod
    def of(cls, obj: Any, store: Any = None) -> "SnapshotRef":
        if isinstance(obj, SnapshotRef):
            return obj
        if isinstance(obj, (str, os.PathLike)) and not str(obj).isdigit():
            path = os.path.realpath(os.fspath(obj))
            if not os.path.isfile(path):
                raise DiskError(f"no such snapshot file: {path}", status=404)
            return cls(key=f"file:{path}", name=os.path.basename(path), path=path)
        if isinstance(obj, (int, str)):
            if store is None:
                raise DiskError("no snapshot store to resolve a snapshot id", status=404)
            obj = store.get(int(obj))
        sid = int(obj.id)
        path = store.snapshot_path(sid) if store is not None and hasattr(store, "snapshot_path") else obj.path
        return cls(key=str(sid), name=str(getattr(obj, "name", sid)), path=str(path), id=sid,
                   draft=getattr(obj, "state", "sealed") == "draft")

    @staticmethod
    def key_of(snapshot: Any) -> str:
        """The key a snapshot (a SnapshotRef, a store snapshot, an id or a file path) has, without I/O."""
        if isinstance(snapshot, SnapshotRef):
            return snapshot.key
        if hasattr(snapshot, "id"):
            return str(snapshot.id)
        if isinstance(snapshot, int) or str(snapshot).isdigit():
            return str(snapshot)
        return f"file:{os.path.realpath(os.fspath(snapshot))}"


@dataclass(frozen=True)
class Export:
    """What the menu renders into a host's kernel command line (the NBD export of its disk)."""

    mac: str
    name: str
    host: str
    port: int
    snapshot_id: Optional[int]
    snapshot_name: str
    size: int
    persistent: bool
    tls: bool
    boot: int
    format: str = "raw"

    @property
    def export(self) -> str:
        return self.name

    @property
    def uri(self) -> str:
        return f"{'nbds' if self.tls else 'nbd'}://{self.host}:{self.port}/{self.name}"

    @property
    def cmdline(self) -> str:
        return f"bootd.nbd={self.host}:{self.port}/{self.name}"

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "name": self.name, "export": self.name, "host": self.host, "port": self.port,
                "uri": self.uri, "cmdline": self.cmdline, "format": self.format, "snapshot_id": self.snapshot_id,
                "snapshot": self.snapshot_name, "size": self.size, "persistent": self.persistent,
                "tls": self.tls, "boot": self.boot}


@dataclass
class ExportRow:
    """One export as stored in `disk_exports` (and kept in memory)."""

    name: str
    mac: str
    boot: int
    main: bool
    snap: SnapshotRef
    overlay: str
    node: str
    persistent: bool
    size: int
    server_ip: str
    created: float
    last_active: float = 0.0
    full: bool = False  # a write past nbd.overlay_max was refused (memory only: until the next boot)
    opened: bool = False  # a client opened it since bootd started (memory only: a draft's release waits for one)

    @property
    def is_draft(self) -> bool:
        """A maintenance host's draft exported as is (see has_overlay)."""
        return not self.has_overlay

    def export(self, port: int, tls: bool) -> Export:
        return Export(self.mac, self.name, self.server_ip, port, self.snap.id, self.snap.name, self.size,
                      self.persistent, tls, self.boot)

    @property
    def has_overlay(self) -> bool:
        """False for a draft exported as is (its own file, over no shared base node)."""
        return self.overlay != self.snap.path


@dataclass
class DiskSettings:
    directory: str
    run_dir: str
    listen: str  # the first NBD address: bootd's own export check connects here
    port: int = 10809
    reap_after: float = 4 * 3600
    reap_interval: float = 60
    maintenance_release_after: float = 10.0  # a draft's export goes this long after its host disconnected
    warn_free_percent: float = 10
    warn_free_bytes: int = 1 << 30
    check_exports: bool = True
    listen_all: list[str] = field(default_factory=list)  # every NBD address (the served ones)
    tls: bool = False
    client_tls: Optional[ClientTls] = None
    gatekeeper: bool = False  # NBD handshakes through bootd's gatekeeper (with TLS too); see gatekeeper.py
    handshake_timeout: float = 10.0  # gatekeeper: seconds a client has for its whole NBD handshake
    handshakes_per_address: int = 8  # gatekeeper: handshakes in progress at once from one address
    aio: str = "io_uring"  # how the storage daemon reads and writes files: io_uring, or threads (qemu's default)
    handoff: bool = True  # gatekept connections continue inside the daemon (handoff.py), not through the splicer
    subclusters: bool = True  # new overlays with qcow2 extended L2 entries (see overlays.py)
    overlay_max: int = 0  # bytes one overlay or persistent layer may use on disk; 0: no limit (exports.py _capped)
