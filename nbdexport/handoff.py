"""Negotiated NBD connections handed into qemu-storage-daemon itself (handoff.c preloaded there).

The gatekeeper (gatekeeper.py) does each handshake between the client's TCP socket and a unix
connection to the daemon. With the hand-off (`nbd.handoff: true`, the default) the client's socket then
replaces the daemon's end of that unix connection inside the daemon (see handoff.c for the exchange),
so qemu serves the client directly: no relay process, no extra wake-up per request. The splicer
(splicer.c) stays as the fallback when the library is not in the daemon (no compiler, a daemon adopted
from a bootd without it, nbd.handoff: false).

Counting: each handed connection gets a slot in `<run dir>/handoff.counters` (a file, so that a bootd
restarted against the same daemon finds its connections: each slot names its export). handoff.c adds
each READ's and WRITE's bytes and requests to it and marks it ended when the daemon closes the socket;
`io(name)` folds ended slots into per-export totals and frees them.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

from bootd.chelper import CFDS_HEADER, build_c_program
from nbdexport.qsd import daemon_socket_path

log = logging.getLogger("bootd.nbd.handoff")

SOURCE = Path(__file__).with_name("handoff.c")
NBDCOUNT_HEADER = Path(__file__).with_name("nbdcount.h")  # the request counting handoff.c and splicer.c share
SLOTS = 8192
SLOT = struct.Struct("=QQQQII88s")  # handoff.c's struct slot: counts, state, pad, export name
FREE, HANDED, LIVE, ENDED = 0, 1, 2, 3
TOKEN_MAGIC = b"BOOTDSWP"
IO_FIELDS = ("read_bytes", "written_bytes", "read_requests", "write_requests")


class NotHanded(OSError):
    """The hand-off did not happen and nothing was given away: the connection can go another way."""


def build_library(run_dir: Path) -> Path:
    """The preload library for the current source (its hash in the name), compiled if missing."""
    Path(run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    return build_c_program(SOURCE, run_dir, "nbd-handoff-", "NBD hand-off library",
                           library=True, suffix=".so", headers=[CFDS_HEADER, NBDCOUNT_HEADER])


# qemu-storage-daemon versions (major.minor) the hand-off library was tested against: it relies on how
# qemu's NBD server reads its socket (recvmsg on the same fd, epoll registrations), which a newer qemu may
# change. Other versions get the splicer, and `bootctl status` says why.
TESTED_QSD_VERSIONS = ("7.2",)


def daemon_version(binary: str) -> Optional[str]:
    """`major.minor.patch` from `qemu-storage-daemon --version`, or None when it cannot be told."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


def untested_reason(binary: str) -> Optional[str]:
    """Why the hand-off must not be used with `binary` (None: a tested version)."""
    version = daemon_version(binary)
    if version is not None and ".".join(version.split(".")[:2]) in TESTED_QSD_VERSIONS:
        return None
    return (f"the hand-off library is tested with qemu-storage-daemon {', '.join(TESTED_QSD_VERSIONS)} only; "
            f"{binary} is {version or 'of an unknown version'}")


class Handoff:
    """bootd's side of handoff.c for one daemon run directory."""

    def __init__(self, run_dir: str | Path, daemon_binary: str = "qemu-storage-daemon"):
        self.run_dir = Path(run_dir)
        self.daemon_binary = daemon_binary
        self.library: Optional[Path] = None
        self.error: Optional[str] = None  # why there is no library (shown as the data path's reason)
        self.handed = 0
        self.failed = 0
        self._gen: Optional[mmap.mmap] = None
        self._map: Optional[mmap.mmap] = None
        self._totals: dict[str, list[int]] = {}
        self._owner: dict[int, str] = {}
        self._free: list[int] = []
        self.known: Callable[[str], bool] = lambda name: True
        self._sock_path = daemon_socket_path(self.run_dir, "handoff.sock")
        self._ready_pid: Optional[int] = None  # the daemon found with the library loaded

    # -- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> Optional[Path]:
        """Build the library and make the counter file (kept if it exists: a running daemon maps it).
        The library's path, for the daemon's LD_PRELOAD; None (logged) if it cannot be built or the
        daemon is of a version the library was not tested with."""
        untested = untested_reason(self.daemon_binary)
        if untested is not None:
            self.error = f"no hand-off: {untested}"
            log.warning("NBD hand-off not used (%s): connections go through the splicer", untested)
            self.library = None
            return None
        try:
            self.library = build_library(self.run_dir)
        except (RuntimeError, OSError) as e:
            self.error = f"no hand-off library: {e}"
            log.warning("NBD hand-off unavailable (%s): connections go through the splicer", e)
            self.library = None
            return None
        self.error = None
        path = self.run_dir / "handoff.counters"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * SLOT.size:
                os.ftruncate(fd, SLOTS * SLOT.size)
            counters = mmap.mmap(fd, SLOTS * SLOT.size)
        finally:
            os.close(fd)
        self._map = counters
        self._load_slots(counters)
        return self.library

    def environment(self) -> dict[str, str]:
        if self.library is None:
            return {}
        return {"LD_PRELOAD": str(self.library), "BOOTD_NBD_HANDOFF": str(self.run_dir)}

    def ready(self, pid: Optional[int]) -> bool:
        """The daemon `pid` has the library loaded and listening (an adopted daemon may not)."""
        if self.library is None or not pid:
            return False
        if pid == self._ready_pid:  # a process's libraries do not change: read its maps once
            return True
        try:
            with open(f"/proc/{pid}/maps") as f:
                if str(self.library) not in f.read():
                    return False
        except OSError:
            return False
        if not (self.run_dir / "handoff.sock").exists():
            return False
        if self._gen is None:
            try:
                fd = os.open(self.run_dir / "handoff.gen", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                self._gen = mmap.mmap(fd, 4096)
            finally:
                os.close(fd)
        self._ready_pid = pid
        return True

    def close(self) -> None:
        for m in (self._gen, self._map):
            if m is not None:
                try:
                    m.close()
                except (BufferError, ValueError):
                    pass
        self._gen = self._map = None

    # -- hand-off -------------------------------------------------------------------------------------
    def hand(self, client: socket.socket, daemon: socket.socket, name: Optional[str]) -> None:
        """Give the negotiated `client` socket to the daemon in place of its end of `daemon` (the unix
        connection the handshake went through). Our copies are closed by the caller. Raises OSError."""
        if self._gen is None:
            raise NotHanded("the NBD hand-off is not ready")
        slot = self._take(name) if name is not None else None
        ident = secrets.randbits(64)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            ctl.settimeout(2.0)
            ctl.connect(self._sock_path())
            msg = struct.pack("=QII", ident, 0xFFFFFFFF if slot is None else slot, 0)
            socket.send_fds(ctl, [msg], [client.fileno()])
        except OSError as e:
            if slot is not None:
                self._release(slot)
            self.failed += 1
            raise NotHanded(str(e)) from e
        finally:
            ctl.close()
        (g,) = struct.unpack_from("=Q", self._gen, 0)
        struct.pack_into("=Q", self._gen, 0, (g + 1) & (2 ** 64 - 1))
        daemon.setblocking(True)
        daemon.settimeout(2.0)
        daemon.sendall(TOKEN_MAGIC + struct.pack("=Q", ident))
        self.handed += 1

    # -- counters -------------------------------------------------------------------------------------
    def _load_slots(self, counters: mmap.mmap) -> None:
        """Which slots are in use (a restarted bootd finds its predecessor's connections by name)."""
        self._owner = {}
        self._free = []
        for slot in range(SLOTS - 1, -1, -1):
            *_, state, _, raw = _read(counters, slot)
            if state == FREE:
                self._free.append(slot)
            else:
                self._owner[slot] = raw.rstrip(b"\0").decode(errors="replace")

    def _take(self, name: str) -> Optional[int]:
        counters = self._map
        if counters is None:
            return None
        if not self._free:
            self._sweep()
        if not self._free:
            return None  # all busy: the connection goes on uncounted
        slot = self._free.pop()
        SLOT.pack_into(counters, slot * SLOT.size, 0, 0, 0, 0, HANDED, 0, name.encode()[:88])
        self._owner[slot] = name
        return slot

    def _release(self, slot: int) -> None:
        if self._map is not None:  # (closed: the slots go with the map)
            struct.pack_into("=I", self._map, slot * SLOT.size + 32, FREE)
        self._owner.pop(slot, None)
        self._free.append(slot)

    def _sweep(self) -> None:
        """Fold the counts of connections the daemon has closed into their export's totals."""
        counters = self._map
        if counters is None:
            return
        for slot, name in list(self._owner.items()):
            rb, wb, ro, wo, state, _, _ = _read(counters, slot)
            if state == ENDED:
                if self.known(name):
                    tot = self._totals.setdefault(name, [0, 0, 0, 0])
                    for i, v in enumerate((rb, wb, ro, wo)):
                        tot[i] += v
                self._release(slot)

    def io(self, name: str) -> dict[str, int]:
        """An export's NBD I/O so far (ended and live connections) and its live connection count."""
        self._sweep()
        tot = list(self._totals.get(name, (0, 0, 0, 0)))
        live = 0
        counters = self._map
        for slot, owner in list(self._owner.items()):
            if owner == name and counters is not None:
                rb, wb, ro, wo, state, _, _ = _read(counters, slot)
                if state in (HANDED, LIVE):
                    live += 1
                for i, v in enumerate((rb, wb, ro, wo)):
                    tot[i] += v
        return {**dict(zip(IO_FIELDS, tot, strict=True)), "connections": live}

    def forget(self, name: str) -> None:
        self._totals.pop(name, None)

    def status(self) -> dict[str, Any]:
        return {"library": str(self.library) if self.library else None, "handed": self.handed,
                "failed": self.failed}


def _read(counters: mmap.mmap, slot: int) -> tuple[Any, ...]:
    """One slot of the counters file: read bytes, written bytes, reads, writes, state, pad, name."""
    return SLOT.unpack_from(counters, slot * SLOT.size)
