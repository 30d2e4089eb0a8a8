"""The snapshot store's files: where layers live, how a new one is written, and what is under way.

No SQL here: the parts that own rows (queries, lifecycle, prune, fsck) call these for the file side of
an operation. A new layer is written under `.tmp-<uuid>.qcow2`, fsynced and renamed to its final name
before any row names it (see snapshots/store.py for the whole ordering).
"""
from __future__ import annotations

import os
import struct
import threading
import uuid
from pathlib import Path

from bootd.units import human

from . import qemu
from .errors import NoSpace, SnapshotError

LOST_FOUND = "lost+found"
TEMP_PREFIX = ".tmp-"


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


def unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def allocated(path: str) -> int:
    """Bytes a file takes on disk (sparse layers take far less than their size); 0 if it is gone."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class LayerFiles:
    """The store's directory: new layer files, the free-space reserve, and the bookkeeping of operations
    under way (fsck leaves their files alone; one flatten per snapshot at a time)."""

    def __init__(self, root: str | Path, min_free_bytes: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_bytes)
        self.lock = threading.Lock()             # guards `flattening` and `inflight`
        self.flattening: set[int] = set()        # snapshot ids with a flatten running
        self.inflight: set[str] = set()          # file names of operations under way: fsck leaves them alone

    def path_of(self, rel: str) -> Path:
        return self.root / rel

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

    def image_dir(self, image: str) -> Path:
        d = self.root / image
        d.mkdir(parents=True, exist_ok=True)
        return d

    def new_file(self, image: str) -> tuple[Path, Path, str]:
        """(temp path, final path, relative file name) for a new layer of `image`."""
        u = uuid.uuid4().hex
        d = self.image_dir(image)
        with self.lock:
            self.inflight.update({f"{image}/{TEMP_PREFIX}{u}.qcow2", f"{image}/{u}.qcow2"})
        return d / f"{TEMP_PREFIX}{u}.qcow2", d / f"{u}.qcow2", f"{image}/{u}.qcow2"

    def release(self, rel: str) -> None:
        """The operation that made `rel` has committed or given up: fsck may judge its files again."""
        image, _, name = rel.partition("/")
        with self.lock:
            self.inflight.discard(rel)
            self.inflight.discard(f"{image}/{TEMP_PREFIX}{name}")

    def is_inflight(self, rel: str) -> bool:
        with self.lock:
            return rel in self.inflight

    def is_flattening(self, snapshot_id: int) -> bool:
        with self.lock:
            return snapshot_id in self.flattening

    @staticmethod
    def publish(tmp: Path, final: Path) -> None:
        """Make a finished temp file durable under its final name."""
        qemu.fsync_file(str(tmp))
        os.rename(tmp, final)
        qemu.fsync_dir(str(final.parent))
