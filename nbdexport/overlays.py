"""Overlay files: the per-host qcow2 layers over a snapshot, and the storage directory they live in.

Layout under the disk directory:
  ephemeral/<machex>.<boot>.<n>.qcow2   one per export of one boot; gone at the next boot
  persistent/<machex>.qcow2             a persistent host's own layer; survives reboots
  templates/<sha>.qcow2                 an empty overlay per base file, copied to make a new overlay

A new overlay is a copy of the empty template for its base (qemu-img runs once per base, not per
boot): copying ~200 KiB costs well under a millisecond, a qemu-img process 10-30 ms on a busy host,
and the boot-to-export budget is 50 ms. Each boot gets a new file name, so a new boot's export can be
added while the previous boot's node is still being torn down.

Overlays have qcow2 extended L2 entries (`extended_l2=on`, qemu >= 5.2; nbd.subclusters, on by default):
each 64 KiB cluster is allocated in 32 subclusters of 2 KiB, so a client's first 4 KiB write into a
cluster writes 4 KiB, instead of first copying the snapshot's other 60 KiB into the overlay. Measured
here (4 KiB random writes at queue depth 16 into a fresh overlay over a 1 GiB snapshot): ~1.5x the IOPS,
and the overlay holds only what the client wrote. The template's name records the format, so turning the
knob makes new templates; existing layers keep the format they were made with.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootd.macaddr import normalize_mac
from nbdexport.errors import DiskError, NoSpace


def mac_hex(mac: str) -> str:
    """The MAC's twelve hex digits, for file names (ValueError if it is not a MAC)."""
    return normalize_mac(mac).replace(":", "")


@dataclass(frozen=True)
class SpaceReport:
    path: str
    total: int
    free: int
    warn_below: int

    @property
    def low(self) -> bool:
        return self.free < self.warn_below

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "free": self.free, "warn_below": self.warn_below,
                "low": self.low}


class OverlayStore:
    def __init__(self, directory: str | Path, qemu_img: str = "qemu-img", subclusters: bool = True):
        self.dir = Path(directory)
        self.qemu_img = qemu_img
        self.subclusters = subclusters
        for sub in ("ephemeral", "persistent", "templates"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def ephemeral_path(self, mac: str, boot: int, n: int) -> Path:
        return self.dir / "ephemeral" / f"{mac_hex(mac)}.{boot}.{n}.qcow2"

    def persistent_path(self, mac: str) -> Path:
        return self.dir / "persistent" / f"{mac_hex(mac)}.qcow2"

    def template_path(self, base: str) -> Path:
        st = os.stat(base)
        key = hashlib.sha1(f"{os.path.realpath(base)}:{st.st_ino}:{st.st_mtime_ns}".encode()).hexdigest()[:20]
        return self.dir / "templates" / f"{key}{'.x' if self.subclusters else ''}.qcow2"

    def has_template(self, base: str) -> bool:
        try:
            return self.template_path(base).exists()
        except OSError:
            return False

    def template_for(self, base: str) -> Path:
        """The empty overlay over `base`, made once with qemu-img (backing path recorded in its header)."""
        path = self.template_path(base)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
            opts = ["-o", "extended_l2=on"] if self.subclusters else []
            proc = subprocess.run([self.qemu_img, "create", "-q", "-f", "qcow2", *opts, "-b",
                                   os.path.realpath(base), "-F", "qcow2", str(tmp)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
                msg = proc.stderr.strip().splitlines()
                if "No space left" in proc.stderr:
                    raise NoSpace(f"disk directory {self.dir} is full")
                raise DiskError(f"cannot make an overlay over {base}: {msg[-1] if msg else proc.returncode}")
            os.replace(tmp, path)
        return path

    def create(self, base: str, path: Path) -> None:
        """A fresh empty overlay over `base` at `path` (replacing whatever was there)."""
        template = self.template_for(base)
        tmp = path.with_name(path.name + ".new")
        try:
            shutil.copyfile(template, tmp)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if e.errno == 28:
                raise NoSpace(f"disk directory {self.dir} is full") from e
            raise DiskError(f"cannot create overlay {path}: {e.strerror}") from e

    @staticmethod
    def remove(path: str | Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def ephemeral_files(self) -> list[Path]:
        return sorted(p for p in (self.dir / "ephemeral").iterdir() if p.is_file())

    def persistent_files(self) -> list[Path]:
        return sorted(p for p in (self.dir / "persistent").iterdir() if p.is_file())

    def prune_templates(self, keep: set[str]) -> None:
        for p in (self.dir / "templates").iterdir():
            if str(p) not in keep:
                self.remove(p)

    def space(self, warn_percent: float, warn_bytes: int) -> SpaceReport:
        st = os.statvfs(self.dir)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return SpaceReport(str(self.dir), total, free, max(int(total * warn_percent / 100), warn_bytes))


def allocated_bytes(path: str | Path) -> int:
    """Bytes the overlay really uses on disk (what it costs), not its apparent size."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
