"""Helpers for the disk tests (tests/nbd has no __init__.py: a package named `nbd` would shadow libnbd):
base qcow2 images with known content, and a DiskManager driving a real qemu-storage-daemon on a free
loopback port (its process is killed after the test, whatever happens)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from bootd.state import open_state
from nbdexport.manager import DiskManager
from nbdexport.model import DiskSettings
from nbdexport.qsd import StorageDaemon

MiB = 1 << 20


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_base(path: Path, size_mb: int = 64, pattern: int = 0xAB, backing: Path | None = None) -> Path:
    """A qcow2 whose first MiB is `pattern` bytes (so a client can tell snapshots apart)."""
    if backing is None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mb}M"], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path)],
                       check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(path)], check=True,
                   capture_output=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kill_qsd(run_dir: Path) -> None:
    try:
        pid = int((Path(run_dir) / "qsd.pid").read_text())
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"qemu-storage-daemon" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


class Harness:
    """A DiskManager with its own state file, disk directory and daemon, run on one asyncio loop."""

    def __init__(self, tmp: Path, persistent: set[str] | None = None, directory: Path | None = None,
                 resolve=None, snapshots=None, port: int | None = None, tls=None,
                 listen: list[str] | None = None, run_dir: Path | None = None,
                 qsd_binary: str = "qemu-storage-daemon", daemon: type[StorageDaemon] = StorageDaemon, **kw):
        self.tmp = tmp
        self.daemon = daemon  # a StorageDaemon subclass lets a test slow the real daemon's answers
        self.qsd_binary = qsd_binary
        self.snapshots = snapshots
        self.tls = tls
        self.listen = listen or ["127.0.0.1"]
        self.port = port or free_port()
        self.run_dir = run_dir or tmp / "run"
        self.directory = directory or tmp / "disks"
        self.persistent = persistent if persistent is not None else set()
        self.resolve = resolve or (lambda mac: None)
        self.settings = DiskSettings(directory=str(self.directory), run_dir=str(self.run_dir),
                                     listen=self.listen[0], listen_all=self.listen, port=self.port,
                                     reap_interval=3600, **{"tls": tls is not None, **kw})
        self.loop = asyncio.new_event_loop()
        self.store = None
        self.m = None

    def start(self) -> "Harness":
        self.store = self.store or open_state(self.tmp / "state.db")
        qsd = self.daemon(self.settings.run_dir, self.listen, self.port, tls=self.tls, binary=self.qsd_binary)
        self.m = DiskManager(self.settings, self.store, qsd, resolve_snapshot=lambda mac: self.resolve(mac),
                             is_persistent=lambda mac: mac in self.persistent,
                             snapshot_store=lambda: self.snapshots)
        self.run(self.m.start())
        return self

    def run(self, coro, timeout: float = 60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def settle(self, seconds: float = 0.05) -> None:
        """Let background tasks (teardowns, restarts) run."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def wait(self, predicate, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached"
            self.settle(0.05)

    def wait_restarted(self, restarts: int) -> None:
        """Until the daemon was restarted `restarts` times and its exports are back: `restarts` counts the
        new process before its restore, which runs under qsd.lock (a blocking client call made in between
        would find no export, with the loop standing still until it returns)."""
        qsd = self.m.qsd
        self.wait(lambda: qsd.restarts == restarts and qsd.up.is_set() and not qsd.lock.locked())

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def abandon(self) -> None:
        """Like a kill -9 of bootd: the loop and the state file go, the daemon stays."""
        if self.m is not None:
            gk = self.m.gatekeeper
            if gk is not None:  # the kernel closes a killed bootd's listening and control sockets
                if gk.sock is not None:
                    gk.sock.close()
                if gk.splicer.ctl is not None:
                    gk.splicer.ctl.close()  # the splicer ends once its connections have
            self.m.qsd._unwatch()
            qmp = self.m.qsd.qmp
            if qmp is not None and getattr(qmp, "_writer", None) is not None:
                qmp._writer.transport.abort()  # the kernel closes a killed process's sockets
            for t in asyncio.all_tasks(self.loop):
                t.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
        self.store.conn.close()
        self.store = None
        self.loop.close()
        self.loop = asyncio.new_event_loop()
        self.m = None

    def stop(self) -> None:
        try:
            if self.m is not None and not self.loop.is_closed():
                self.run(self.m.stop())
        finally:
            kill_qsd(self.run_dir)
            if not self.loop.is_closed():
                self.loop.close()
            if self.store is not None:
                try:
                    self.store.close()
                except Exception:
                    pass


