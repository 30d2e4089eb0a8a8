"""One supervised qemu-storage-daemon, driven over QMP with `qemu.qmp`.

The data path (qcow2 decoding, NBD) stays in QEMU's C code; bootd only adds and removes block nodes
and exports. The daemon is started in its own session so that a kill -9 of bootd leaves it serving:
a restarted bootd *adopts* it (pid file + QMP socket), so running boots keep their connections. If the
daemon itself dies, it is restarted with backoff and `on_restart` puts every export back.

Death is noticed through a pidfd (works for a child and for an adopted process alike), not by
polling.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from bootd.pidwatch import PidWatch
from nbdexport.errors import DiskError, StorageDaemonDown

log = logging.getLogger("bootd.nbd.qsd")
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

BACKOFF = (0.1, 0.3, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class TlsSettings:
    """qemu tls-creds object for the NBD server: x509 (dir with ca-cert.pem, server-cert.pem,
    server-key.pem) or psk (dir with keys.psk holding `identity:hexkey` lines)."""

    kind: str  # "x509" | "psk"
    dir: str
    verify_peer: bool = True

    def object_arg(self) -> str:
        if self.kind == "psk":
            return f"tls-creds-psk,id=tls0,endpoint=server,dir={self.dir}"
        return (f"tls-creds-x509,id=tls0,endpoint=server,dir={self.dir},"
                f"verify-peer={'on' if self.verify_peer else 'off'}")


class StorageDaemon:
    """Starts (or adopts), watches and restarts qemu-storage-daemon; `execute` runs one QMP command."""

    def __init__(self, run_dir: str | Path, host: str | list[str], port: int, tls: Optional[TlsSettings] = None,
                 binary: str = "qemu-storage-daemon",
                 on_restart: Optional[Callable[[], Awaitable[None]]] = None,
                 on_event: Optional[Callable[[str, dict[str, Any]], None]] = None):
        self.run_dir = Path(run_dir)
        self.hosts = [host] if isinstance(host, str) else list(host)
        self.host = self.hosts[0]
        self.port, self.tls, self.binary = port, tls, binary
        self.on_restart = on_restart
        self.on_event = on_event or (lambda kind, detail: None)
        self.qmp: Optional[QMPClient] = None
        self.pid: Optional[int] = None
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.adopted = False
        self.restarts = 0
        self.started_at: Optional[float] = None
        self.up = asyncio.Event()
        self._pidwatch = PidWatch()
        self._stopping = False
        self._restart_task: Optional[asyncio.Task[None]] = None
        self.lock = asyncio.Lock()  # held by whoever changes the export set (and by the restore)
        # NBD on a private unix socket in run_dir (this file name) instead of TCP: bootd's gatekeeper
        # (nbdexport/gatekeeper.py) owns the TCP port then
        self.nbd_unix: Optional[str] = None
        self.extra_env: dict[str, str] = {}  # e.g. the NBD hand-off library's LD_PRELOAD (handoff.py)
        # called with the node name of each BLOCK_WRITE_THRESHOLD event (an overlay at nbd.overlay_max)
        self.on_write_threshold: Optional[Callable[[str], None]] = None
        self._events_task: Optional[asyncio.Task[None]] = None

    # -- paths -------------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "qsd.pid"

    @property
    def args_path(self) -> Path:
        return self.run_dir / "qsd.json"

    def _identity(self) -> dict[str, Any]:
        """What a running daemon must match to be adopted instead of replaced."""
        if self.nbd_unix:
            return {"unix": self.nbd_unix, "binary": self.binary, "tls": None}
        return {"hosts": self.hosts, "port": self.port, "binary": self.binary,
                "tls": self.tls.object_arg() if self.tls else None}

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not await self._adopt():
            await self._spawn()
        self._watch()

    async def stop(self) -> None:
        """Quit the daemon (every export goes); used on a normal bootd stop."""
        self._stopping = True
        if self._restart_task:
            self._restart_task.cancel()
        self._unwatch()
        pid = self.pid
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), 2)
            except Exception:
                pass
            await self._drop_qmp()
        if pid:
            for _ in range(40):
                if not _alive(pid):
                    break
                if self.proc is not None:
                    self.proc.poll()
                await asyncio.sleep(0.05)
            else:
                _kill(pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None
        self.up.clear()
        for p in (self.pid_path, self.args_path, self.qmp_path, self.run_dir / "qsd.log", self.run_dir / "nbd.sock"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            self.run_dir.rmdir()
        except OSError:
            pass

    async def _adopt(self) -> bool:
        """Take over a daemon left by a previous bootd (killed hard) if it is ours and configured alike."""
        try:
            pid = int(self.pid_path.read_text().strip())
            ident = json.loads(self.args_path.read_text())
        except (OSError, ValueError):
            return False
        if not _alive(pid) or not _is_qsd(pid, self.qmp_path):
            return False
        if ident != self._identity():
            log.info("storage daemon pid %d runs another configuration; replacing it", pid)
            _kill(pid, signal.SIGKILL)
            await _wait_dead(pid)
            return False
        try:
            await self._connect()
        except Exception as e:
            log.warning("cannot adopt storage daemon pid %d (%s); replacing it", pid, e)
            _kill(pid, signal.SIGKILL)
            await _wait_dead(pid)
            return False
        self.pid, self.proc, self.adopted = pid, None, True
        self.started_at = time.time()
        self.up.set()
        log.info("adopted running qemu-storage-daemon pid %d", pid)
        self.on_event("adopted", {"pid": pid})
        return True

    async def _spawn(self) -> None:
        for p in (self.qmp_path, self.pid_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if self.nbd_unix:
            listener = unix_listening_socket(self.run_dir, self.nbd_unix)
        else:
            listener = listening_socket(self.hosts, self.port)
        nbd_server = f"addr.type=fd,addr.str={listener.fileno()}"
        argv = [self.binary,
                # relative to its working directory (run_dir): a unix socket path has at most 107 bytes
                "--chardev", "socket,id=qmp0,path=qmp.sock,server=on,wait=off",
                "--monitor", "chardev=qmp0",
                "--pidfile", "qsd.pid"]
        if self.tls and not self.nbd_unix:
            argv += ["--object", self.tls.object_arg()]
            nbd_server += ",tls-creds=tls0"
        argv += ["--nbd-server", nbd_server]
        # its messages go to a file: a pipe would outlive the bootd that reads it (adoption)
        errlog = open(self.run_dir / "qsd.log", "ab")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                         start_new_session=True, pass_fds=[listener.fileno()],
                                         cwd=str(self.run_dir),
                                         env={**os.environ, **self.extra_env} if self.extra_env else None)
        except FileNotFoundError as e:
            raise DiskError(f"cannot start {self.binary}: {e}") from e
        finally:
            listener.close()
            errlog.close()
        self.pid, self.adopted = self.proc.pid, False
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                err = (self.run_dir / "qsd.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise DiskError(f"qemu-storage-daemon exited at start: {err[0] if err else self.proc.returncode}")
            if time.monotonic() > deadline:
                _kill(self.proc.pid, signal.SIGKILL)
                raise DiskError("qemu-storage-daemon did not create its QMP socket within 10 s")
            await asyncio.sleep(0.01)
        while True:  # the socket file exists from bind(), a moment before listen()
            try:
                await self._connect()
                break
            except Exception as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    _kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
                    raise DiskError(f"cannot reach qemu-storage-daemon over QMP: {e}") from e
                await asyncio.sleep(0.01)
        self.args_path.write_text(json.dumps(self._identity()))
        self.started_at = time.time()
        self.up.set()
        if self.nbd_unix:
            log.info("qemu-storage-daemon pid %d serving NBD on %s (behind the gatekeeper)", self.pid,
                     self.run_dir / self.nbd_unix)
        else:
            log.info("qemu-storage-daemon pid %d serving NBD on %s port %d%s", self.pid, ", ".join(self.hosts),
                     self.port, " (TLS)" if self.tls else "")

    async def _connect(self) -> None:
        qmp = QMPClient("bootd")
        path = str(self.qmp_path)
        dirfd = None
        if len(path.encode()) > 100:  # too long for sockaddr_un: reach it through a directory fd
            dirfd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
            path = f"/proc/self/fd/{dirfd}/qmp.sock"
        try:
            await asyncio.wait_for(qmp.connect(path), 5)
        finally:
            if dirfd is not None:
                os.close(dirfd)
        self.qmp = qmp
        listener = EventListener(("BLOCK_WRITE_THRESHOLD",))
        qmp.register_listener(listener)
        self._events_task = asyncio.get_running_loop().create_task(self._events(listener))

    async def _events(self, listener: EventListener) -> None:
        """Hand the daemon's write-threshold events to `on_write_threshold` (set by the DiskManager)."""
        async for event in listener:
            data = event.get("data")
            node = data.get("node-name") if isinstance(data, dict) else None
            if isinstance(node, str) and node and self.on_write_threshold is not None:
                try:
                    self.on_write_threshold(node)
                except Exception as e:  # a bug there must not stop the events
                    log.error("write threshold event for %s: %s", node, e)

    async def _drop_qmp(self) -> None:
        qmp, self.qmp = self.qmp, None
        task, self._events_task = self._events_task, None
        if task is not None:
            task.cancel()
        if qmp is not None:
            try:
                await asyncio.wait_for(qmp.disconnect(), 2)
            except BaseException:
                pass

    # -- watching ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        self._unwatch()
        if not self.pid:
            return
        try:
            self._pidwatch.start(self.pid, self._died)
        except ProcessLookupError:
            self._died()
            return

    def _unwatch(self) -> None:
        self._pidwatch.stop()

    def _died(self) -> None:
        self._unwatch()
        if self.proc is not None:
            self.proc.poll()
        self.up.clear()
        if self._stopping:
            return
        status = self.proc.returncode if self.proc is not None else None
        log.error("qemu-storage-daemon pid %s died (status %s); restarting it with its exports", self.pid, status)
        self.on_event("died", {"pid": self.pid, "status": status})
        self.pid = None
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        await self._drop_qmp()
        attempt = 0
        while not self._stopping:
            try:
                async with self.lock:
                    await self._spawn()
                    self._watch()
                    self.restarts += 1
                    if self.on_restart is not None:
                        await self.on_restart()
                self.on_event("restarted", {"pid": self.pid, "restarts": self.restarts})
                return
            except Exception as e:
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                attempt += 1
                log.error("restarting qemu-storage-daemon failed (%s); next try in %.1f s", e, delay)
                await asyncio.sleep(delay)

    # -- commands ----------------------------------------------------------------------------------
    async def execute(self, cmd: str, args: Optional[dict[str, Any]] = None, timeout: float = 10) -> Any:
        if self.qmp is None or not self.up.is_set():
            raise StorageDaemonDown("the storage daemon is restarting; try again in a moment")
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)
        except QMPError as e:
            raise DiskError(f"{cmd}: {e}") from e
        except (EOFError, ConnectionError, asyncio.TimeoutError) as e:
            raise StorageDaemonDown(f"{cmd}: storage daemon not answering ({e.__class__.__name__})") from e

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "up": self.up.is_set(), "restarts": self.restarts, "adopted": self.adopted,
                "listen": (str(self.run_dir / self.nbd_unix) if self.nbd_unix
                           else ", ".join(f"{h}:{self.port}" for h in self.hosts)),
                "tls": self.tls.kind if self.tls else None}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_qsd(pid: int, qmp_path: Path) -> bool:
    """Is `pid` a qemu-storage-daemon serving QMP on `qmp_path` (relative to its working directory)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return (bool(argv) and argv[0].endswith(b"qemu-storage-daemon") and any(b"path=qmp.sock" in a for a in argv)
            and os.path.realpath(cwd) == os.path.realpath(qmp_path.parent))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def _wait_dead(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


SO_ATTACH_FILTER = 26
SKF_NET_OFF = -0x100000


def _dst_filter(addresses: list[str]) -> list[tuple[int, int, int, int]]:
    """Classic BPF: accept a packet whose IPv4 destination is one of `addresses`, drop the rest. On a
    listening TCP socket it runs on the SYN, so connections to other local addresses never open."""
    prog = [(0x20, 0, 0, SKF_NET_OFF + 16 & 0xFFFFFFFF)]  # ld [net + 16]: the IPv4 destination
    for i, a in enumerate(addresses):
        prog.append((0x15, len(addresses) - i, 0, struct.unpack("!I", socket.inet_aton(a))[0]))  # jeq -> accept
    prog.append((0x06, 0, 0, 0))  # ret 0: drop
    prog.append((0x06, 0, 0, 0xFFFFFFFF))  # ret all: accept
    return prog


def listening_socket(addresses: list[str], port: int) -> socket.socket:
    """The NBD listener, made here and handed to the daemon (fd): bound to the one served address, or to
    every address with a filter admitting only connections to the served ones (qemu has one listener)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if len(addresses) > 1:
            prog = _dst_filter(addresses)
            code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                            struct.pack("HL", len(prog), ctypes.addressof(code)))
            sock.bind(("0.0.0.0", port))
        else:
            sock.bind((addresses[0], port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise DiskError(f"NBD cannot listen on {', '.join(addresses)} port {port}: {e.strerror}") from e
    sock.set_inheritable(True)
    return sock


def unix_listening_socket(run_dir: Path, name: str) -> socket.socket:
    """The daemon's private NBD listener (gatekeeper mode): `run_dir/name`, mode 0600, made under a
    temporary name, chmod-ed, then renamed, so it is never reachable with wider permissions. Bound
    through a directory fd: the path may be longer than a unix address holds."""
    dirfd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp = f".{name}.{os.getpid()}"
        for n in (tmp, name):
            try:
                os.unlink(n, dir_fd=dirfd)
            except FileNotFoundError:
                pass
        sock.bind(f"/proc/self/fd/{dirfd}/{tmp}")
        os.chmod(tmp, 0o600, dir_fd=dirfd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise DiskError(f"NBD cannot listen on {run_dir}/{name}: {e.strerror}") from e
    finally:
        os.close(dirfd)
    sock.set_inheritable(True)
    return sock


def daemon_socket_path(run_dir: str | Path, name: str = "nbd.sock") -> Callable[[], str]:
    """A connectable path to the daemon's socket whatever the run directory's length (sockaddr_un holds
    107 bytes): through a directory fd kept open for the process's lifetime."""
    full = os.path.join(str(run_dir), name)
    if len(full.encode()) <= 100:
        return lambda: full
    holder: dict[str, int] = {}

    def path() -> str:
        fd = holder.get("fd")
        if fd is None:
            fd = holder["fd"] = os.open(str(run_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{fd}/{name}"
    return path
