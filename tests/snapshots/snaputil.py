"""Helpers for snapshot tests: real disk images made with qemu-img/mke2fs, read back through libnbd."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbd

MiB = 1024 * 1024


def make_raw_disk(path: Path, size_mb: int = 32, pattern: int | None = 0x11, at: int = 8 * MiB) -> Path:
    """A raw disk with an MBR partition table (so blkid sees a disk image) and a known 1 MiB block at `at`."""
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(path)], check=True)
    write_mbr(path, start_lba=2048, sectors=4096)
    if pattern is not None:
        qemu_io(path, f"write -P {pattern:#x} {at} 1M", fmt="raw")
    return path


def write_mbr(path: Path, start_lba: int, sectors: int) -> None:
    """One Linux partition in a DOS partition table: what blkid calls PTTYPE=dos."""
    import struct
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start_lba, sectors)
    with open(path, "r+b") as f:
        f.seek(446)
        f.write(entry + b"\0" * 48 + b"\x55\xaa")


def qemu_io(path: Path | str, command: str, fmt: str = "qcow2", readonly: bool = False) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", fmt]
    if readonly:
        argv += ["-r", "-U"]
    argv += ["-c", command, str(path)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def write_pattern(path: Path | str, pattern: int, offset: int, length: int = MiB) -> None:
    r = qemu_io(path, f"write -P {pattern:#x} {offset} {length}")
    assert r.returncode == 0, r.stderr + r.stdout


def read_bytes(path: Path | str, offset: int, length: int) -> bytes:
    """Read through a real NBD server (qemu-nbd, read-only, socket-activated by libnbd)."""
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", str(path)])
        return bytes(h.pread(length, offset))
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def pattern_at(path: Path | str, offset: int, length: int = MiB) -> int | None:
    """The byte repeated over [offset, offset+length), or None when the range is not one repeated byte."""
    data = read_bytes(path, offset, length)
    return data[0] if data == bytes([data[0]]) * len(data) else None


def backing_of(path: Path | str) -> str | None:
    import json
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out).get("backing-filename")


def mode_of(path: Path | str) -> int:
    return os.stat(path).st_mode & 0o777


def patterns_at(path: Path | str, offsets: list[int], length: int = MiB) -> list[int | None]:
    """pattern_at for several offsets over one NBD connection."""
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", str(path)])
        out = []
        for off in offsets:
            data = bytes(h.pread(length, off))
            out.append(data[0] if data == bytes([data[0]]) * len(data) else None)
        return out
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass
