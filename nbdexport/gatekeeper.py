"""NBD handshake gatekeeper: policy in Python, data path in C.

qemu-storage-daemon 7.2 answers NBD_OPT_LIST with every export name and cannot tie an export to a client
address, so a PC that lists could open another PC's disk. With the gatekeeper (`nbd.gatekeeper: true`,
the default) the daemon's NBD server listens only on a private unix socket (`<run dir>/nbd.sock`, mode
0600), and bootd listens on the NBD TCP port of the served addresses. For each connection bootd does the
fixed-newstyle negotiation between the client and the daemon:

  * the greeting (NBDMAGIC, IHAVEOPT, handshake flags) and the client flags are passed through;
  * every client option is read (16-byte header; option data over MAX_OPTION bytes closes the
    connection) and:
      - NBD_OPT_LIST is answered here with only the exports the peer may open, never forwarded;
      - NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: the export
        name is parsed; allowed only if the export belongs to the host whose address is the peer's
        (DiskManager.may_open: the MAC at the peer's address by a live binding, bootd/peers.py),
        else NBD_REP_ERR_UNKNOWN is answered here (counted as nbd.refused);
      - NBD_OPT_EXPORT_NAME: same check; a refusal closes the connection (the only answer the
        protocol has);
      - anything else is forwarded; the daemon's replies are parsed and passed back up to the
        option's final reply (NBD_REP_ACK or an error);
  * negotiation ends with the NBD_REP_ACK of a successful GO, or with the EXPORT_NAME reply (8 + 2
    bytes, + 124 zero bytes unless NO_ZEROES). Only exact byte counts are ever read from either socket,
    so nothing of the transmission phase is in Python's hands at that point.

Then the data path leaves Python, one of two ways:
  * hand-off (`nbd.handoff: true`, the default; nbdexport/handoff.py and handoff.c): the client's
    socket goes into qemu-storage-daemon itself, in place of the daemon's end of the unix connection
    the handshake went through, so qemu serves the client directly. Used when the daemon has the
    library loaded (bootd starts it so; an adopted daemon may not have it);
  * splice (the fallback, and `nbd.handoff: false`): both sockets are passed over SCM_RIGHTS to
    `splicer.c`, a small long-running C process (compiled at run time into the run directory with gcc
    -O2 when missing or outdated) that moves the bytes both ways under epoll (through a buffer per
    direction; the NBD headers of the requests are counted on the way). Each spliced connection gets a
    slot in a shared counter array (a memfd): the splicer adds the bytes and requests of every READ and
    WRITE to it, and bootd sums the slots of an export (`Splicer.io(name)`). bootd supervises it and
    restarts it if it dies; the connections it carried are lost then (the clients reconnect, and their
    export names still work). A splicer outlives a bootd killed hard, serving its connections until
    they end (its control socket closed, it takes no new ones and exits after the last).
Both count per export what `bootctl disk list` and /metrics show, since qemu 7.2's query-blockstats
counts nothing for NBD exports.

When neither C path can run (no compiler, the run directory on a `noexec` mount, the splicer down and
not coming back) the gatekeeper does NOT fall back to exposing the daemon on TCP (qemu would list and
open every export for anyone): the negotiated connection is relayed in Python instead (`_relay`: asyncio
streams both ways, requests counted like the C helpers count them). Slow, but the access control holds;
`bootctl status` shows the data path (`data_path`: handoff / splicer / python-relay) and why.

With TLS (`nbd.tls`) the gatekeeper stays in front as well: it answers NBD_OPT_STARTTLS itself and
terminates TLS with Python's ssl module (`tls_server_context`), so every option inside TLS is checked
exactly as without TLS (LIST shows a host its own exports, GO/EXPORT_NAME of another host's export is
refused) and the transmission phase goes through the Python relay (a TLS session cannot be handed to
qemu). A lab sharing one PSK therefore still gets per-host isolation. qemu's own TLS cannot give it:
its tls-authz is per server, not per export, and qemu 7.2 answers LIST with every name.

Handshakes are bounded: `timeout` (default 10 s, as qemu drops an unfinished handshake since its
CVE-2024-7409 fix), at most MAX_HANDSHAKES at once and at most `per_address` (nbd.handshakes_per_address)
from one address, so one address holding idle handshakes cannot lock every other host out.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import signal
import socket
import ssl
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Union

from bootd.chelper import CFDS_HEADER, SupervisedHelper, build_c_program
from bootd.metrics import Metrics
from nbdexport.handoff import NBDCOUNT_HEADER, Handoff, NotHanded
from nbdexport.qsd import listening_socket

log = logging.getLogger("bootd.nbd.gatekeeper")

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_ERR = 1 << 31
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6

MAX_OPTION = 4096 + 1024  # names are at most 4096 bytes (spec); a little room for info requests / queries
MAX_REPLY = 1 << 20
HANDSHAKE_TIMEOUT = 10.0  # as qemu since its CVE-2024-7409 fix (nbd.handshake_timeout)
MAX_HANDSHAKES = 512  # connections in negotiation at once; more are closed at once (negotiated ones do not count)
HANDSHAKES_PER_ADDRESS = 8  # in negotiation at once from one address (nbd.handshakes_per_address)

SPLICER_SOURCE = Path(__file__).with_name("splicer.c")
SPLICER_NICE = -10
COUNTER_SLOTS = 8192  # connections counted at once (more are relayed uncounted)
SLOT = struct.Struct("=QQQQ")  # rd_bytes, wr_bytes, rd_ops, wr_ops: splicer.c's struct slot
IO_FIELDS = ("read_bytes", "written_bytes", "read_requests", "write_requests")


class Closed(Exception):
    """The connection is to be closed (peer gone, malformed, refused EXPORT_NAME)."""


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise Closed("eof")
        buf += chunk
    return bytes(buf)


def _reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, rtype, len(data)) + data


def _name_of(option: int, data: bytes) -> Optional[str]:
    """The export name in GO/INFO/LIST_META_CONTEXT/SET_META_CONTEXT option data; None if malformed."""
    if len(data) < 4:
        return None
    (n,) = struct.unpack(">I", data[:4])
    if n > 4096 or 4 + n > len(data):
        return None
    rest = len(data) - 4 - n
    if option in (OPT_GO, OPT_INFO):
        if rest < 2:
            return None
        (k,) = struct.unpack(">H", data[4 + n:6 + n])
        if rest != 2 + 2 * k:
            return None
    elif rest < 4:
        return None
    try:
        return data[4:4 + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_splicer(run_dir: Path) -> Path:
    """The splicer binary for the current source (its hash in the name), compiled if missing."""
    Path(run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    return build_c_program(SPLICER_SOURCE, run_dir, "nbd-splicer-", "NBD splicer",
                           headers=[CFDS_HEADER, NBDCOUNT_HEADER])


class _Counters:
    """The shared counter array of one splicer process, and which export each slot counts for."""

    def __init__(self, slots: int = COUNTER_SLOTS):
        self.fd = os.memfd_create("bootd-nbd-counters", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, slots * SLOT.size)
        self.map = mmap.mmap(self.fd, slots * SLOT.size)
        self.free = list(range(slots - 1, -1, -1))
        self.owner: dict[int, str] = {}

    def take(self, name: str) -> Optional[int]:
        if not self.free:
            return None
        slot = self.free.pop()
        self.owner[slot] = name
        return slot

    def read(self, slot: int) -> tuple[int, int, int, int]:
        return SLOT.unpack_from(self.map, slot * SLOT.size)

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class Splicer(SupervisedHelper):
    """The supervised C splicer: `hand(client, daemon, name)` gives it a negotiated connection."""

    what = "NBD splicer"
    SEND_TIMEOUT = 2.0  # sends wait a little for a busy splicer
    STOP_SIGNAL = signal.SIGTERM  # it would otherwise serve its connections on after the control socket closed
    STOP_POLL = 0.02

    def __init__(self, run_dir: str | Path, on_event: Callable[[str, dict[str, Any]], None] = lambda k, d: None):
        super().__init__(run_dir)
        self.on_event = on_event
        self.handed = 0
        self._counters: Optional[_Counters] = None
        self._totals: dict[str, list[int]] = {}  # export -> IO_FIELDS of its ended connections
        self.known: Callable[[str], bool] = lambda name: True  # exports still worth totals (set by the manager)

    def _build(self) -> Path:
        return build_splicer(self.run_dir)

    def _command(self, ctl_fd: int) -> tuple[list[str], list[int]]:
        self._drop_counters()
        self._counters = _Counters()
        return [str(self.binary), str(ctl_fd), str(self._counters.fd)], [self._counters.fd]

    def _spawned(self) -> None:
        if self.proc is None:
            return
        try:  # a relay: little CPU, but every wake-up it waits for adds to each request's latency
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, SPLICER_NICE)
        except OSError:
            pass

    def _on_ctl(self) -> None:
        """The splicer says which connections ended (4-byte slot numbers): fold their counts."""
        while (msg := self._recv(64)):
            if len(msg) == 4 and self._counters is not None:
                self._fold(self._counters, struct.unpack("=I", msg)[0])

    def _gone(self, status: Optional[int]) -> None:
        self._drop_counters()
        if self._stopping:
            return
        log.error("NBD splicer died (status %s): its connections are lost; restarting it", status)
        self.on_event("splicer_died", {"status": status})

    def _restarted(self) -> None:
        self.on_event("splicer_restarted", {"pid": self.proc.pid if self.proc is not None else None})

    def _fold(self, counters: _Counters, slot: int) -> None:
        name = counters.owner.pop(slot, None)
        if name is None:
            return
        if self.known(name):
            tot = self._totals.setdefault(name, [0, 0, 0, 0])
            for i, v in enumerate(counters.read(slot)):
                tot[i] += v
        counters.free.append(slot)

    def _drop_counters(self) -> None:
        """The splicer is gone: every connection it carried ended; keep what they counted."""
        counters, self._counters = self._counters, None
        if counters is None:
            return
        for slot in list(counters.owner):
            self._fold(counters, slot)
        counters.close()

    def io(self, name: str) -> dict[str, int]:
        """An export's NBD I/O so far (ended and live connections) and its live connection count."""
        tot = list(self._totals.get(name, (0, 0, 0, 0)))
        live = 0
        counters = self._counters
        if counters is not None:
            for slot, owner in list(counters.owner.items()):
                if owner == name:
                    live += 1
                    for i, v in enumerate(counters.read(slot)):
                        tot[i] += v
        return {**dict(zip(IO_FIELDS, tot, strict=True)), "connections": live}

    def forget(self, name: str) -> None:
        """An export is gone for good (its boot ended): drop its totals."""
        self._totals.pop(name, None)

    def hand(self, client: socket.socket, daemon: socket.socket, name: Optional[str] = None) -> None:
        """Pass both sockets to the splicer (our copies are closed by the caller), counted for export
        `name`. Raises OSError."""
        if self.ctl is None:
            raise OSError("the NBD splicer is restarting")
        counters = self._counters
        slot = counters.take(name) if counters is not None and name is not None else None
        msg = b"c" if slot is None else b"s" + struct.pack("<I", slot)
        try:
            socket.send_fds(self.ctl, [msg], [client.fileno(), daemon.fileno()])
        except OSError:
            if slot is not None and counters is not None:
                counters.owner.pop(slot, None)
                counters.free.append(slot)
            if self.proc is not None and self.proc.poll() is not None:
                self._died()
            raise
        self.handed += 1

    def status(self) -> dict[str, Any]:
        return {"pid": self.proc.pid if self.proc is not None else None, "up": self.up,
                "restarts": self.restarts, "connections_handed": self.handed}


REQUEST_MAGIC = 0x25609513
CMD_READ, CMD_WRITE = 0, 1
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length (28 bytes)
RELAY_CHUNK = 256 << 10


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The OpenSSL SSL_CTX* inside a Python SSLContext (CPython's PySSLContext: the object header, then
    the pointer). Checked against the context's own options before use, so a layout change fails loudly."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or _libssl().SSL_CTX_get_options(ptr) != int(ctx.options):
        raise RuntimeError("cannot reach OpenSSL's SSL_CTX of Python's ssl module (PSK needs it)")
    return ptr


_PSK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)


def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL("libssl.so.3")  # the one Python's _ssl is linked against (already loaded)
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _PSK_CALLBACK]
    lib.SSL_CTX_set_psk_server_callback.restype = None
    return lib


def read_psk_file(path: str | Path) -> dict[bytes, bytes]:
    """qemu's keys.psk format: `identity:hexkey` lines (one shared lab key, or one per host)."""
    keys: dict[bytes, bytes] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        ident, sep, hexkey = line.strip().partition(":")
        try:
            keys[ident.encode()] = bytes.fromhex(hexkey)
        except ValueError:
            raise ValueError(f"{path}:{n}: not an identity:hexkey line") from None
        if not sep or not ident or not keys[ident.encode()]:
            raise ValueError(f"{path}:{n}: not an identity:hexkey line")
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


class _ServerContext(ssl.SSLContext):
    """An SSLContext that also holds what must live as long as it: the ctypes PSK callback."""

    psk_callback: object = None


def tls_server_context(kind: str, directory: str, verify_peer: bool = True) -> ssl.SSLContext:
    """The gatekeeper's TLS server side, from the same files qemu's tls-creds objects read: x509
    (ca-cert.pem, server-cert.pem, server-key.pem) or psk (keys.psk). Python 3.11's ssl has no PSK API
    (set_psk_server_callback came in 3.13), so for psk OpenSSL's SSL_CTX_set_psk_server_callback is set
    through ctypes on the context's SSL_CTX (checked: libnbd/GnuTLS clients connect over TLS 1.3)."""
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    d = Path(directory)
    if kind == "x509":
        ctx.load_cert_chain(d / "server-cert.pem", d / "server-key.pem")
        if verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(d / "ca-cert.pem")
        return ctx
    keys = read_psk_file(d / "keys.psk")

    def lookup(_ssl_ptr: Optional[int], identity: Optional[bytes], out: ctypes._Pointer[ctypes.c_ubyte],
               max_len: int) -> int:
        key = keys.get(identity or b"")
        if key is None or len(key) > max_len:
            return 0  # unknown identity: the handshake fails
        ctypes.memmove(out, key, len(key))
        return len(key)

    callback = _PSK_CALLBACK(lookup)
    ctx.set_ciphers("PSK")  # TLS 1.2 PSK suites; TLS 1.3 uses the PSK with its own suites
    _libssl().SSL_CTX_set_psk_server_callback(_ssl_ctx_pointer(ctx), callback)
    ctx.psk_callback = callback  # OpenSSL holds only the C pointer: keep the ctypes object alive
    return ctx


async def _server_streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket, made the way asyncio.start_server makes them: only then does
    StreamWriter.start_tls take the server side."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.StreamWriter] = []
    reader = asyncio.StreamReader(limit=RELAY_CHUNK)
    protocol = asyncio.StreamReaderProtocol(reader, lambda r, w: made.append(w))
    await loop.connect_accepted_socket(lambda: protocol, sock=sock)
    return reader, made[0]


class _SocketPeer:
    """The client's side of a plain handshake: the raw socket (it can be handed off afterwards)."""

    tls = False

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def recv_exact(self, n: int) -> bytes:
        return await _recv_exact(self.loop, self.sock, n)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await _server_streams(self.sock)


class _StreamPeer:
    """The client's side of a TLS handshake: asyncio streams, upgraded at NBD_OPT_STARTTLS."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.tls = False

    async def recv_exact(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise Closed("eof") from None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def start_tls(self, ctx: ssl.SSLContext) -> None:
        try:
            await self.writer.start_tls(ctx)
        except (ssl.SSLError, ConnectionError) as e:
            raise Closed(f"TLS handshake failed: {e}") from None
        self.tls = True

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return self.reader, self.writer


_ClientPeer = Union[_SocketPeer, _StreamPeer]


class ExportPolicy(Protocol):
    """Who may list and open which export (nbdexport/access.py AccessPolicy)."""

    def exports_for_peer(self, peer_ip: str) -> list[str]: ...

    def may_open(self, peer_ip: str, name: str) -> bool: ...


class Gatekeeper:
    """Listens on the NBD TCP port; negotiates; hands negotiated connections on (see the module docstring).

    `policy` must offer `exports_for_peer(ip) -> list[str]` and `may_open(ip, name) -> bool`.
    `daemon_socket()` gives the path to connect to (the daemon's private unix socket). `tls`: the
    server context when clients must STARTTLS (tls_server_context)."""

    def __init__(self, addresses: Iterable[str], port: int, daemon_socket: Callable[[], str], policy: ExportPolicy,
                 splicer: Splicer, metrics: Optional[Metrics] = None, timeout: float = HANDSHAKE_TIMEOUT,
                 handoff: Optional[Handoff] = None, daemon_pid: Callable[[], Optional[int]] = lambda: None,
                 per_address: int = HANDSHAKES_PER_ADDRESS, tls: Optional[ssl.SSLContext] = None):
        self.addresses = list(addresses)
        self.port = port
        self.daemon_socket = daemon_socket
        self.policy = policy
        self.splicer = splicer
        self.splicer_error: Optional[str] = None  # why the splicer never started (set by the manager)
        self.handoff = handoff  # handoff.Handoff: into the daemon itself when its library is loaded there
        self.daemon_pid = daemon_pid
        self.metrics = metrics
        self.timeout = timeout
        self.per_address = per_address
        self.tls = tls
        self.sock: Optional[socket.socket] = None
        self._accept_task: Optional[asyncio.Task[None]] = None
        self._conns: set[asyncio.Task[None]] = set()
        self._handshaking: dict[str, int] = {}  # peer address -> handshakes in progress
        self._warned: set[str] = set()  # addresses told about (at the per-address cap)
        self._relay_totals: dict[str, list[int]] = {}  # export -> IO_FIELDS of ended relayed connections
        self._relay_live: dict[int, tuple[str, list[int]]] = {}  # id -> (export, IO_FIELDS so far)
        self.counts = {"accepted": 0, "spliced": 0, "handed_off": 0, "relayed": 0, "refused": 0, "bad": 0,
                       "listed": 0}
        # told of every refused export (peer address, name asked for): the daemon makes it a failed
        # boot step of the PC at that address (bootd/hoststate.py); set after construction
        self.on_refused: Callable[[str, Optional[str]], None] = lambda peer, name: None

    def _inc(self, name: str, **labels: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.metrics is not None:
            self.metrics.inc("nbd", name if name == "refused" else f"gatekeeper_{name}", 1, **labels)

    async def start(self) -> None:
        sock = self.sock = listening_socket(self.addresses, self.port)
        sock.set_inheritable(False)
        sock.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        log.info("NBD gatekeeper on %s port %d%s", ", ".join(self.addresses), self.port,
                 " (TLS)" if self.tls is not None else "")

    async def stop(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except BaseException:
                pass
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def handshakes(self) -> int:
        return sum(self._handshaking.values())

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and the like: do not spin
                log.warning("NBD gatekeeper accept: %s", e)
                await asyncio.sleep(0.1)
                continue
            self.counts["accepted"] += 1
            peer = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
            if self.handshakes() >= MAX_HANDSHAKES:
                self._inc("bad", reason="too-many-handshakes")
                conn.close()
                continue
            mine = self._handshaking.get(peer, 0)
            if mine >= self.per_address:
                self._inc("bad", reason="handshakes-per-address")
                if peer not in self._warned:  # once per burst, not once per connection
                    self._warned.add(peer)
                    log.warning("NBD client %s holds %d handshakes (nbd.handshakes_per_address); closing more",
                                peer, mine)
                conn.close()
                continue
            self._handshaking[peer] = mine + 1
            t = loop.create_task(self._serve(conn, peer))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    def _handshake_done(self, peer: str) -> None:
        n = self._handshaking.get(peer, 0) - 1
        if n > 0:
            self._handshaking[peer] = n
        else:
            self._handshaking.pop(peer, None)
            self._warned.discard(peer)

    async def _serve(self, client: socket.socket, peer: str) -> None:
        client.setblocking(False)
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.setblocking(False)
        writers: list[asyncio.StreamWriter] = []
        try:
            try:
                if self.tls is not None:
                    reader, writer = await _server_streams(client)
                    writers.append(writer)
                    cpeer: _ClientPeer = _StreamPeer(reader, writer)
                else:
                    cpeer = _SocketPeer(client)
                name = await asyncio.wait_for(self._negotiate(cpeer, daemon, peer), self.timeout)
            finally:
                self._handshake_done(peer)
            path = self._hand(cpeer, client, daemon, name)
            if path == "python-relay":
                await self._relay(cpeer, daemon, name, writers)
        except asyncio.TimeoutError:
            log.info("NBD client %s: no handshake within %.0f s; closed", peer, self.timeout)
            self._inc("bad", reason="timeout")
        except Closed as e:
            log.debug("NBD client %s: closed (%s)", peer, e)
        except OSError as e:
            log.debug("NBD client %s: %s", peer, e)
        except asyncio.CancelledError:
            pass
        finally:
            for w in writers:  # at once: closing the sockets under a transport still flushing is unsafe
                w.transport.abort()
            client.close()
            daemon.close()

    async def _negotiate(self, client: _ClientPeer, daemon: socket.socket, peer: str) -> Optional[str]:
        """The fixed-newstyle negotiation between `client` (_SocketPeer / _StreamPeer) and the daemon;
        returns the export name once the transmission phase begins (raises Closed otherwise)."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(daemon, self.daemon_socket())
        greeting = await _recv_exact(loop, daemon, 18)
        if greeting[:8] != NBDMAGIC or struct.unpack(">Q", greeting[8:16])[0] != IHAVEOPT:
            raise Closed("the storage daemon did not greet in fixed-newstyle")
        (hflags,) = struct.unpack(">H", greeting[16:18])
        await client.send(greeting)
        cflags_raw = await client.recv_exact(4)
        (cflags,) = struct.unpack(">I", cflags_raw)
        await loop.sock_sendall(daemon, cflags_raw)
        no_zeroes = bool(hflags & FLAG_NO_ZEROES and cflags & FLAG_NO_ZEROES)
        while True:
            hdr = await client.recv_exact(16)
            magic, option, length = struct.unpack(">QII", hdr)
            if magic != IHAVEOPT:
                self._inc("bad", reason="magic")
                raise Closed("bad option magic")
            if length > MAX_OPTION:
                self._inc("bad", reason="oversized")
                log.warning("NBD client %s sent %d bytes of option data (option %d); closed", peer, length, option)
                raise Closed("oversized option")
            data = await client.recv_exact(length)

            if self.tls is not None and not client.tls:
                # before TLS only STARTTLS (and ABORT) mean anything; nothing reaches the daemon
                if option == OPT_STARTTLS and not length and isinstance(client, _StreamPeer):
                    await client.send(_reply(option, REP_ACK))
                    await client.start_tls(self.tls)
                    continue
                if option in (OPT_EXPORT_NAME, OPT_ABORT):
                    raise Closed("no TLS")
                await client.send(_reply(option, REP_ERR_TLS_REQD if option != OPT_STARTTLS else REP_ERR_INVALID))
                continue
            if option == OPT_STARTTLS:  # plain gatekeeper, or TLS already on
                await client.send(_reply(option, REP_ERR_INVALID if self.tls is not None else REP_ERR_POLICY))
                continue

            if option == OPT_LIST:
                if length:
                    await client.send(_reply(option, REP_ERR_INVALID))
                    continue
                out = b""
                for listed in self.policy.exports_for_peer(peer):
                    raw = listed.encode()
                    out += _reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                await client.send(out + _reply(option, REP_ACK))
                self._inc("listed")
                continue

            if option == OPT_EXPORT_NAME:
                name: Optional[str]
                try:
                    name = data.decode("utf-8")
                except UnicodeDecodeError:
                    name = None
                if name is None or not self.policy.may_open(peer, name):
                    self._refused(peer, name, option)
                    raise Closed("export refused")
                await loop.sock_sendall(daemon, hdr + data)
                answer = await _recv_exact(loop, daemon, 10 if no_zeroes else 134)
                await client.send(answer)
                return name

            if option in (OPT_GO, OPT_INFO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                name = _name_of(option, data)
                if name is None:
                    await client.send(_reply(option, REP_ERR_INVALID))
                    continue
                if not self.policy.may_open(peer, name):
                    self._refused(peer, name, option)
                    await client.send(_reply(option, REP_ERR_UNKNOWN))
                    continue

            # forwarded: relay the daemon's replies up to the final one
            await loop.sock_sendall(daemon, hdr + data)
            while True:
                rh = await _recv_exact(loop, daemon, 20)
                rmagic, ropt, rtype, rlen = struct.unpack(">QIII", rh)
                if rmagic != REPLY_MAGIC or rlen > MAX_REPLY:
                    raise Closed("unexpected reply from the storage daemon")
                rdata = await _recv_exact(loop, daemon, rlen) if rlen else b""
                await client.send(rh + rdata)
                if rtype == REP_ACK or rtype & REP_ERR:
                    break
            if option == OPT_GO and rtype == REP_ACK:
                return _name_of(option, data)
            if option == OPT_ABORT:
                raise Closed("client aborted")

    def _refused(self, peer: str, name: Optional[str], option: int) -> None:
        self._inc("refused", reason="not-the-host")
        log.warning("NBD: %s asked for export %s… (option %d), which is not its own: refused", peer,
                    (name or "?")[:6], option)
        try:
            self.on_refused(peer, name)
        except Exception as e:  # the refusal stands whatever the hook does
            log.error("NBD: cannot record the refusal for %s: %s", peer, e)

    def _hand(self, cpeer: _ClientPeer, client: socket.socket, daemon: socket.socket, name: Optional[str]) -> str:
        """Which way the negotiated connection goes on; handoff and splicer take it here (our copies of
        the sockets are closed by the caller), "python-relay" is then served by the caller."""
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if cpeer.tls:
            self._inc("relayed")
            return "python-relay"
        if self.handoff is not None and self.handoff.ready(self.daemon_pid()):
            try:
                self.handoff.hand(client, daemon, name)
                self._inc("handed_off")
                return "handoff"
            except NotHanded as e:  # nothing was given away: the splicer can still take it
                log.warning("NBD hand-off failed (%s); this connection goes another way", e)
        if self.splicer.up:
            try:
                self.splicer.hand(client, daemon, name)
                self._inc("spliced")
                return "splicer"
            except OSError as e:
                log.warning("NBD splicer refused a connection (%s); it is relayed in Python", e)
        self._inc("relayed")
        return "python-relay"

    async def _relay(self, cpeer: _ClientPeer, daemon: socket.socket, name: Optional[str],
                     writers: list[asyncio.StreamWriter]) -> None:
        """The transmission phase in Python: the client's requests to the daemon (READ and WRITE counted
        from their headers, as nbdcount.h does), the daemon's replies back, until either side closes."""
        creader, cwriter = await cpeer.streams()
        if cwriter not in writers:
            writers.append(cwriter)
        dreader, dwriter = await asyncio.open_unix_connection(sock=daemon)
        writers.append(dwriter)
        io = [0, 0, 0, 0]
        key = id(io)
        if name is not None:
            self._relay_live[key] = (name, io)

        async def requests() -> None:
            parsing = True
            while True:
                if not parsing:
                    data = await creader.read(RELAY_CHUNK)
                    if not data:
                        return
                    dwriter.write(data)
                    await dwriter.drain()
                    continue
                try:
                    hdr = await creader.readexactly(REQUEST.size)
                except asyncio.IncompleteReadError:
                    return
                dwriter.write(hdr)
                magic, _flags, kind, _handle, _offset, length = REQUEST.unpack(hdr)
                if magic != REQUEST_MAGIC:  # not an NBD request: relay on, stop counting
                    parsing = False
                elif kind == CMD_READ:
                    io[0] += length
                    io[2] += 1
                elif kind == CMD_WRITE:
                    io[1] += length
                    io[3] += 1
                    while length:
                        data = await creader.read(min(length, RELAY_CHUNK))
                        if not data:
                            return
                        dwriter.write(data)
                        length -= len(data)
                        if dwriter.transport.get_write_buffer_size() > RELAY_CHUNK:
                            await dwriter.drain()
                await dwriter.drain()

        async def replies() -> None:
            while True:
                data = await dreader.read(RELAY_CHUNK)
                if not data:
                    return
                cwriter.write(data)
                await cwriter.drain()

        up = asyncio.ensure_future(requests())
        down = asyncio.ensure_future(replies())
        try:
            done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            if up in done and not down.done():  # the client is done (NBD_CMD_DISC): let the daemon finish
                try:
                    dwriter.write_eof()
                    await asyncio.wait_for(down, 10)
                except (OSError, asyncio.TimeoutError):
                    pass
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._relay_live.pop(key, None)
            if name is not None and self.splicer.known(name):
                tot = self._relay_totals.setdefault(name, [0, 0, 0, 0])
                for i, v in enumerate(io):
                    tot[i] += v

    def relay_io(self, name: str) -> dict[str, int]:
        """An export's NBD I/O through the Python relay (ended and live connections)."""
        tot = list(self._relay_totals.get(name, (0, 0, 0, 0)))
        live = 0
        for owner, io in list(self._relay_live.values()):
            if owner == name:
                live += 1
                for i, v in enumerate(io):
                    tot[i] += v
        return {**dict(zip(IO_FIELDS, tot, strict=True)), "connections": live}

    def forget(self, name: str) -> None:
        self.splicer.forget(name)
        self._relay_totals.pop(name, None)

    def data_path(self) -> tuple[str, Optional[str]]:
        """How new connections go on after their handshake, and why not a faster way."""
        if self.tls is not None:
            return "python-relay", "nbd.tls: the gatekeeper terminates TLS, so it relays the data itself"
        why = []
        if self.handoff is not None:
            if self.handoff.ready(self.daemon_pid()):
                return "handoff", None
            why.append(self.handoff.error or "the storage daemon has not loaded the hand-off library "
                       "(see qsd.log in the run directory)")
        if self.splicer.up:
            return "splicer", "; ".join(why) or None
        why.append(self.splicer_error or "the splicer is restarting")
        return "python-relay", "; ".join(why)

    def status(self) -> dict[str, Any]:
        path, why = self.data_path()
        return {"listen": ", ".join(f"{a}:{self.port}" for a in self.addresses), **self.counts,
                "data_path": path, "data_path_reason": why, "tls": self.tls is not None,
                "handshakes": self.handshakes(), "handshakes_per_address": self.per_address,
                "handshake_timeout": self.timeout,
                "splicer": self.splicer.status(),
                "handoff": self.handoff.status() if self.handoff is not None else None}
