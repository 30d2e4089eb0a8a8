"""The asyncio side of TFTP: sockets, timers and bookkeeping around the sans-IO ReadSession.

One listening socket per served address takes requests; every transfer gets its own socket,
connected to the client (its transfer ID), so the kernel delivers only that client's packets to it
and a stray or forged packet from elsewhere never reaches the session. The data path is the
socket's reader callback: recv -> ReadSession.receive -> send, with no task or future per packet.

The jobs around it live next to it: the limits a request is checked against (bootd/tftp/limits.py),
dynamic files asked before the disk (bootd/tftp/providers.py; `add_provider` here registers one),
the open files shared between transfers and read without stalling the loop (bootd/tftp/filecache.py),
and the boot event a finished transfer leaves (bootd/tftp/events.py).

The data pump: with `data_pump="c"` (the default; `tftp.data_pump` in the config) the data phase of
octet-mode transfers of disk files runs in a small C process (bootd/tftp/pump.c, built at run time,
supervised by bootd/tftp/pump.py): once the session socket, the file and the negotiated options are
ready, both fds and the ReadSession's parameters go to the pump, which mirrors the ReadSession's rules
and reports the outcome back; bookkeeping and boot events stay here. Dynamic files, netascii, and every
transfer while the pump is down or when it cannot be built, use the Python path below.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from bootd import peers
from bootd.metrics import Metrics
from bootd.tftp.events import BootEventLog, record_not_found, record_transfer
from bootd.tftp.filecache import CacheFull, FileCache, SharedFile
from bootd.tftp.limits import ServerLimits
from bootd.tftp.paths import PathRefused, normalize
from bootd.tftp.providers import Provider, ProviderFailed, Providers
from bootd.tftp.pump import DataPump, default_run_dir
from bootd.tftp.session import (
    OP_RRQ,
    OP_WRQ,
    ErrorCode,
    MalformedPacket,
    ReadSession,
    Request,
    SessionLimits,
    encode_error,
    parse_request,
)

log = logging.getLogger("bootd.tftp")
_monotonic = time.monotonic

IP_MTU = getattr(socket, "IP_MTU", 14)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
READ_CHUNK = 65536
EXECUTOR_CHUNK = 256 * 1024

Address = tuple[str, int]


@dataclass(eq=False)
class _Transfer:
    """The I/O half of one session. Until `_begin` has set it up only the request's fields are set;
    `sock` goes back to None when the socket is closed or handed to the C pump."""

    key: Address  # the client's address and port: its transfer ID
    ip: str
    path: str
    sock: Optional[socket.socket] = None
    session: Optional[ReadSession] = None
    file: Optional[SharedFile] = None
    data: Optional[bytes] = None  # provider answer
    mac: Optional[str] = None
    dynamic: bool = False
    reading: bool = False
    timer: Optional[asyncio.TimerHandle] = None
    timer_at: float = 0.0
    closed: bool = False
    pump_id: int = 0  # non-zero: the data phase runs in the C pump

    @property
    def live(self) -> ReadSession:
        """The session, for the data path (which only runs once `_begin` has built it)."""
        session = self.session
        if session is None:
            raise RuntimeError(f"tftp: the transfer of {self.path} for {self.ip} has no session yet")
        return session


class TftpServer:
    """A read-only TFTP server on the running event loop."""

    def __init__(self, root: str, *, limits: Optional[SessionLimits] = None,
                 server_limits: Optional[ServerLimits] = None, store: Optional[BootEventLog] = None,
                 metrics: Optional[Metrics] = None, mac_resolver: Optional[Callable[[str], Optional[str]]] = None,
                 data_pump: str = "c", run_dir: Union[str, Path, None] = None,
                 host_namer: Optional[Callable[[str], Optional[str]]] = None):
        if data_pump not in ("c", "python"):
            raise ValueError(f"data_pump must be 'c' or 'python', not {data_pump!r}")
        self.root = os.fspath(root)
        self.limits = limits or SessionLimits()
        self.server_limits = server_limits or ServerLimits()
        self.store = store
        self.metrics = metrics
        self.resolve_mac = mac_resolver or peers.resolver(store)  # the daemon passes peers.mac_at
        self.name_of = host_namer or (lambda mac: None)  # a MAC's host name, for warnings (bootd/hoststate.py)
        self.providers = Providers()
        self.files = FileCache()
        self._listeners: dict[Address, socket.socket] = {}
        self._transfers: dict[Address, _Transfer] = {}
        self._per_client: dict[str, int] = {}  # client address -> its entries in _transfers
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.totals = {"completed": 0, "failed": 0, "refused": 0, "bytes": 0}
        self.data_pump = data_pump
        self.run_dir = run_dir
        self.pump: Optional[DataPump] = None
        self.pump_fallback: Optional[str] = None  # why the C pump is not used (logged once)
        self._pumped: dict[int, _Transfer] = {}
        self._pump_seq = 0
        self.pumped_sessions = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (from `start` or `listen` on)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the TFTP server is not started")
        return loop

    # -- provider seam (bootd/tftp/providers.py) -----------------------------------------------------
    def add_provider(self, provider: Provider, pattern: Union[str, re.Pattern[str], None] = None) -> Provider:
        """Serve names matching `pattern` (glob or regex; None: every name) from `provider` first."""
        return self.providers.add(provider, pattern)

    def remove_provider(self, provider: Provider) -> None:
        self.providers.remove(provider)

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[Address]:
        return list(self._listeners)

    async def start(self, addresses: list[Address]) -> None:
        self._loop = asyncio.get_running_loop()
        _raise_nofile_limit()
        await self._start_pump()
        for host, port in addresses:
            await self.listen(host, port)

    async def listen(self, host: str, port: int) -> Address:
        loop = self._loop = self._loop or asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        bound_host, bound_port = sock.getsockname()
        name = (str(bound_host), int(bound_port))
        self._listeners[name] = sock
        loop.add_reader(sock.fileno(), self._on_request_readable, sock)
        log.info("tftp: serving %s on %s:%d", self.root, *name)
        return name

    async def _start_pump(self) -> None:
        if self.data_pump != "c" or self.pump is not None or self.pump_fallback is not None:
            return
        pump = DataPump(self.run_dir or default_run_dir(), self._pump_end, self._pump_lost)
        try:
            await pump.start()
        except Exception as e:
            self.pump_fallback = str(e)
            log.warning("tftp: the C data pump is not available (%s): file data is served from Python", e)
            return
        self.pump = pump

    async def close_listeners(self) -> None:
        for sock in self._listeners.values():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()

    async def stop(self) -> None:
        await self.close_listeners()
        for task in list(self._tasks):
            task.cancel()
        if self.pump is not None:
            pump, self.pump = self.pump, None
            await pump.stop()  # it ends its transfers with an ERROR, like the loop below
            self._pump_lost("server shutting down")
        for t in list(self._transfers.values()):
            if t.session is not None and not t.session.finished:
                self._send(t, t.session.abort("server shutting down", self.loop.time()))
            self._close(t)
        self._transfers.clear()
        self._per_client.clear()

    def status(self) -> dict[str, object]:
        return {
            "addresses": [f"{h}:{p}" for h, p in self.addresses],
            "root": self.root,
            "active_sessions": len(self._transfers),
            "open_files": len(self.files),
            "providers": len(self.providers),
            **self.totals,
            "data_pump": self.pump_status(),
        }

    def pump_status(self) -> dict[str, object]:
        """`mode` as configured; `active`: where new file transfers go now (c or python)."""
        out: dict[str, object] = {
            "mode": self.data_pump, "active": "c" if self.pump is not None and self.pump.up else "python",
            "sessions": self.pumped_sessions, "running": len(self._pumped)}
        if self.pump is not None:
            out.update(self.pump.status())
        if self.pump_fallback:
            out["fallback"] = self.pump_fallback
        return out

    def gauges(self) -> dict[str, float]:
        return {"active_sessions": len(self._transfers), "open_files": len(self.files)}

    # -- requests ----------------------------------------------------------------------------------
    def _count(self, name: str, value: float = 1, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("tftp", name, value, **labels)

    def _on_request_readable(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, (client_host, client_port) = sock.recvmsg(65536, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP errors queued on the listener: nothing to do
                log.debug("tftp listener: %s", e)
                continue
            addr: Address = (client_host, client_port)
            local = sock.getsockname()[0]
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                    local = socket.inet_ntoa(value[4:8])
            try:
                self._on_request(data, addr, local, sock)
            except Exception:  # one bad request must never take the listener down
                log.exception("tftp: error handling a request from %s", addr)
                self._count("errors", reason="internal")

    def _on_request(self, data: bytes, addr: Address, local: str, sock: socket.socket) -> None:
        self._count("received")
        try:
            req = parse_request(data)
        except MalformedPacket as e:
            self._count("malformed")
            if len(data) >= 2 and data[0] == 0 and data[1] in (OP_RRQ, OP_WRQ):
                self._reply(sock, addr, ErrorCode.ILLEGAL_OPERATION, f"malformed request: {e}")
            return
        if req.is_write:
            self._refuse(sock, addr, "write", ErrorCode.ACCESS_VIOLATION,
                         "write requests are not accepted (read-only server)")
            return
        if req.mode not in ("octet", "netascii"):
            self._refuse(sock, addr, "mode", ErrorCode.ILLEGAL_OPERATION, f"unsupported mode {req.mode!r}")
            return
        key = addr
        if key in self._transfers:
            self._count("ignored", reason="duplicate-request")
            return
        if len(self._transfers) >= self.server_limits.max_sessions:
            self._refuse(sock, addr, "busy", ErrorCode.NOT_DEFINED, "server busy: too many transfers, retry later")
            return
        if self._per_client.get(addr[0], 0) >= self.server_limits.max_sessions_per_client:
            self._refuse(sock, addr, "per-client", ErrorCode.NOT_DEFINED,
                         "server busy: too many transfers from this address, retry later")
            return
        try:
            path = normalize(req.filename, self.server_limits.leading_slash)
        except PathRefused as e:
            log.info("tftp: %s asked for %r: refused (%s)", addr[0], req.filename, e.reason)
            self._refuse(sock, addr, "not-found", ErrorCode.FILE_NOT_FOUND, "File not found")
            return
        t = _Transfer(key=key, ip=addr[0], path=path)
        self._transfers[key] = t
        self._per_client[t.ip] = self._per_client.get(t.ip, 0) + 1
        task = self.loop.create_task(self._begin(t, req, local, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, sock: socket.socket, addr: Address, code: int, message: str) -> None:
        try:
            sock.sendto(encode_error(code, message), addr)
        except OSError:
            pass

    def _refuse(self, sock: socket.socket, addr: Address, reason: str, code: int, message: str) -> None:
        self._count("refused", reason=reason)
        self.totals["refused"] += 1
        self._reply(sock, addr, code, message)

    async def _begin(self, t: _Transfer, req: Request, local: str, listener: socket.socket) -> None:
        addr = t.key
        try:
            t.mac = self.resolve_mac(t.ip)
            try:
                data = await self.providers.ask(t.path, t.ip, t.mac)
                if data is not None:
                    t.data, t.dynamic, size = data, True, len(data)
                else:
                    t.file = await self.files.open(self.root, t.path, self.server_limits.max_open_files)
                    size = t.file.size
            except PathRefused as e:
                if isinstance(e, ProviderFailed):
                    self._count("errors", reason="provider")
                log.info("tftp: %s asked for %r: %s", t.ip, req.filename, e.reason)
                if self.store is not None and t.mac is not None:
                    record_not_found(self.store, mac=t.mac, ip=t.ip, path=t.path, host=self.name_of(t.mac),
                                     why=e.reason if isinstance(e, ProviderFailed) else None)
                self._drop(t)
                self._refuse(listener, addr, "not-found", ErrorCode.FILE_NOT_FOUND, "File not found")
                return
            except CacheFull as e:
                self._drop(t)
                self._refuse(listener, addr, "busy", ErrorCode.NOT_DEFINED, f"server busy: {e}, retry later")
                return
            try:
                sock = t.sock = self._session_socket(local, addr)
            except OSError as e:
                self._drop(t)
                reason = "busy" if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS) else "socket"
                self._refuse(listener, addr, reason, ErrorCode.NOT_DEFINED, "server busy, retry later")
                return
            if t.closed:  # stopped meanwhile
                self._close(t)
                return
            mtu: Optional[int]
            try:
                mtu = sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
            except OSError:
                mtu = None
            now = self.loop.time()
            session = t.session = ReadSession(req, now=now, size=size, limits=self.limits, path_mtu=mtu)
            window = session.blksize * session.windowsize
            if window > 200_000:
                for opt in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, min(2 * window, 8 << 20))
                        break
                    except OSError:
                        continue
            self._count("sessions_started")
            if t.file is not None and not session.netascii and self._hand_to_pump(t, session, sock, t.file):
                return
            self.loop.add_reader(sock.fileno(), self._on_readable, t)
            self._send(t, session.start(now))
            self._fill(t)
            self._after(t)
        except asyncio.CancelledError:
            self._close(t)
            raise
        except Exception:
            log.exception("tftp: cannot start a transfer of %r for %s", t.path, t.ip)
            self._count("errors", reason="internal")
            if t.session is None:
                self._reply(listener, addr, ErrorCode.NOT_DEFINED, "internal error")
            self._close(t)

    def _session_socket(self, local: str, addr: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:
                sock.bind((local, 0))
            except OSError:
                sock.bind(("", 0))
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- the C data pump ---------------------------------------------------------------------------
    def _hand_to_pump(self, t: _Transfer, s: ReadSession, sock: socket.socket, f: SharedFile) -> bool:
        """Give the data phase of `t` to the pump; False: serve it from Python (pump down or busy)."""
        pump = self.pump
        if pump is None or not pump.up:
            return False
        limits = s.limits
        self._pump_seq += 1
        ident = self._pump_seq
        try:
            pump.hand(ident, sock, f.opened.fd, size=f.size, blksize=s.blksize,
                      windowsize=s.windowsize, retries=limits.retries, rto=s.rto_base,
                      max_timeout=max(limits.max_timeout, s.rto_base), session_timeout=limits.session_timeout,
                      oack=s.oack)
        except OSError as e:
            log.debug("tftp: handing a transfer to the pump failed (%s): served from Python", e)
            self._count("pump_hand_failed")
            return False
        t.pump_id = ident
        self._pumped[ident] = t
        self.pumped_sessions += 1
        self._count("sessions_pumped")
        sock.close()  # the pump holds its own copy
        t.sock = None
        return True

    def _pump_end(self, ident: int, outcome: str, nbytes: int, end: float, retransmits: int, dup_acks: int,
                  blocks: int, ignored: int) -> None:
        t = self._pumped.pop(ident, None)
        if t is None:
            return
        t.live.finished_elsewhere(outcome, end, bytes_acked=nbytes, retransmits=retransmits,
                                  duplicate_acks=dup_acks, blocks_sent=blocks, ignored=ignored)
        self._close(t)

    def _pump_lost(self, why: str = "data pump died") -> None:
        """The pump is gone with its sessions: free their bookkeeping (their clients retry)."""
        lost = list(self._pumped.values())
        self._pumped.clear()
        if lost and why == "data pump died":
            self._count("pump_sessions_lost", len(lost))
        if why == "data pump died":
            self._count("pump_deaths")
        now = self.loop.time()
        for t in lost:
            session = t.live
            session.finished_elsewhere("aborted", now)
            session.error_message = why
            self._close(t)

    # -- the data path -------------------------------------------------------------------------------
    def _on_readable(self, t: _Transfer) -> None:
        """The hot path: one ACK in, the next block(s) out. Kept flat on purpose (every call counts
        when a lock-step transfer waits on it once per block)."""
        session = t.live
        sock = t.sock
        if sock is None:  # closed (its reader is removed then; a callback already queued lands here)
            return
        now = _monotonic()  # what loop.time() returns, without the extra call
        for _ in range(32):
            try:
                data = sock.recv(2048)  # ACK or ERROR: small; no 64 KiB buffer per packet
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # ICMP port unreachable: the client's port is gone
                session.abort("client unreachable", now)
                session.outcome = "unreachable"
                break
            except OSError as e:
                log.debug("tftp: recv from %s: %s", t.ip, e)
                break
            out = session.receive(data, now)
            if out:
                # sent something: back to the loop rather than a recv that would say EAGAIN (one
                # syscall less per block; the level-triggered poll reports anything still queued)
                self._send(t, out)
                break
            if session.finished:
                break
        if session.finished:
            self._close(t)
            return
        if not t.reading and session.wanted():
            self._fill(t)
        self._after(t)

    def _send(self, t: _Transfer, datagrams: list[bytes]) -> None:
        sock = t.sock
        if sock is None:  # closed or in the pump: nothing goes out from here
            return
        send = sock.send
        try:
            for d in datagrams:
                send(d)
        except OSError as e:
            self._send_failed(t, e)

    def _send_failed(self, t: _Transfer, e: OSError) -> None:
        """A send failed: the rest of this batch is dropped (the retransmission timer covers it)."""
        if isinstance(e, (BlockingIOError, InterruptedError)):
            self._count("send_overruns")  # socket buffer full
        elif isinstance(e, ConnectionRefusedError):
            if t.session is not None and not t.session.finished:
                t.session.abort("client unreachable", self.loop.time())
                t.session.outcome = "unreachable"
        else:
            log.debug("tftp: send to %s: %s", t.ip, e)

    def _fill(self, t: _Transfer) -> None:
        """Feed the session file bytes while it wants them and they come from the page cache."""
        session = t.live
        loop = self.loop
        while not session.finished and not t.reading:
            want = session.wanted()
            if not want:
                return
            if t.data is not None:
                data, t.data = t.data, b""
                self._send(t, session.feed(data, True, loop.time()))
                continue
            f = t.file
            if f is None:
                raise RuntimeError(f"tftp: the transfer of {t.path} for {t.ip} has neither data nor a file")
            offset = session.raw_offset
            left = f.size - offset
            n = min(max(want, READ_CHUNK), left)
            if n <= 0:
                self._send(t, session.feed(b"", True, loop.time()))
                continue
            try:
                cached = f.read_cached(offset, n)
            except OSError as e:
                self._read_failed(t, e)
                return
            if cached is not None:
                if not cached:
                    self._send(t, session.abort("file changed while being read", loop.time()))
                    return
                self._send(t, session.feed(cached, offset + len(cached) >= f.size, loop.time()))
                continue
            t.reading = True
            task = loop.create_task(self._read_in_executor(t, f, offset, max(n, min(EXECUTOR_CHUNK, left))))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

    async def _read_in_executor(self, t: _Transfer, f: SharedFile, offset: int, n: int) -> None:
        try:
            data = await f.read(offset, n)
        except asyncio.CancelledError:
            raise
        except OSError as e:
            t.reading = False
            if not t.closed:
                self._read_failed(t, e)
                self._after(t)
            return
        t.reading = False
        session = t.live
        if t.closed or session.finished:
            return
        if not data:
            self._send(t, session.abort("file changed while being read", self.loop.time()))
        else:
            eof = offset + len(data) >= f.size
            self._send(t, session.feed(data, eof, self.loop.time()))
            self._fill(t)
        self._after(t)

    def _read_failed(self, t: _Transfer, e: OSError) -> None:
        log.error("tftp: reading %s for %s failed: %s", t.path, t.ip, e)
        self._count("errors", reason="read")
        self._send(t, t.live.abort("read error", self.loop.time()))

    def _after(self, t: _Transfer) -> None:
        """Close a finished session or make sure its timer will fire at its deadline."""
        session = t.live
        if session.finished:
            self._close(t)
            return
        session.prepare()
        deadline = session.deadline
        if deadline is None:
            return
        if t.timer is None or t.timer_at > deadline:
            if t.timer is not None:
                t.timer.cancel()
            t.timer_at = deadline
            t.timer = self.loop.call_at(deadline, self._on_timer, t)

    def _on_timer(self, t: _Transfer) -> None:
        t.timer = None
        if t.closed:
            return
        session = t.live
        now = self.loop.time()
        if session.deadline is not None and now >= session.deadline:
            out = session.on_timer(now)
            if out:
                self._send(t, out)
        self._after(t)

    # -- the end of a transfer -----------------------------------------------------------------------
    def _forget(self, t: _Transfer) -> None:
        """Take `t` out of the session table and its client's count (once; a newer transfer from the
        same address and port that took its key stays)."""
        if self._transfers.get(t.key) is not t:
            return
        del self._transfers[t.key]
        left = self._per_client.get(t.ip, 0) - 1
        if left > 0:
            self._per_client[t.ip] = left
        else:
            self._per_client.pop(t.ip, None)

    def _drop(self, t: _Transfer) -> None:
        t.closed = True
        self._forget(t)

    def _close(self, t: _Transfer) -> None:
        if t.closed and t.sock is None:
            self._forget(t)
            return
        t.closed = True
        self._forget(t)
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.sock is not None:
            try:
                self.loop.remove_reader(t.sock.fileno())
            except (ValueError, OSError):
                pass
            t.sock.close()
            t.sock = None
        if t.file is not None:
            self.files.release(t.file)
            t.file = None
        if t.session is not None:
            self._account(t, t.session)

    def _account(self, t: _Transfer, s: ReadSession) -> None:
        end = s.finished_at if s.finished_at is not None else self.loop.time()
        duration = round(end - s.started_at, 6)
        outcome = s.outcome or "aborted"
        nbytes = s.bytes_acked
        if s.retransmits:
            self._count("retransmits", s.retransmits)
        if s.duplicate_acks:
            self._count("duplicate_acks", s.duplicate_acks)
        self._count("bytes_sent", nbytes)
        if outcome == "complete":
            self.totals["completed"] += 1
            self._count("sessions_completed")
        else:
            self.totals["failed"] += 1
            self._count("sessions_failed", reason=outcome)
        self.totals["bytes"] += nbytes
        log.log(logging.INFO if outcome == "complete" else logging.WARNING,
                "tftp: %s %s %s: %d bytes in %.3f s (blksize %d, windowsize %d)",
                t.ip, t.path, outcome, nbytes, duration, s.blksize, s.windowsize)
        if self.store is not None:
            record_transfer(self.store, s, mac=t.mac, ip=t.ip, path=t.path, dynamic=t.dynamic, outcome=outcome,
                            nbytes=nbytes, duration=duration, host=self.name_of(t.mac) if t.mac else None)


def _raise_nofile_limit() -> None:
    """Sessions hold a socket each: lift the soft fd limit to the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
