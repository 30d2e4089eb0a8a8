"""Simulated lab PCs for the boot storm: one Python process, one event loop, N PCs in N network namespaces.

Each PC does what a BIOS PXE ROM and then iPXE do on a real lab PC, with real packets on its own veth on
the lab bridge:

  1. DHCP as the PXE ROM (DISCOVER/OFFER/REQUEST/ACK; option 60 `PXEClient:Arch:00000:UNDI:002001`,
     93 arch 0, 94 UNDI 2.1, 97 a GUID from the MAC), resent on the PXE spec's 4/8/16/32 s schedule,
     over an AF_PACKET socket on the PC's interface (it has no address yet) with a BPF filter that lets in
     only UDP to port 68 for this PC's MAC (broadcast or unicast);
  2. the leased address goes on the interface (rtnetlink from a socket made in the PC's namespace);
  3. TFTP read of the loader the reply names (siaddr or option 66, file or option 67; RFC 1350 with the
     blksize option when the server answers OACK, plain 512-byte blocks when it does not);
  4. DHCP again as iPXE (options 77 "iPXE" and 175), resent on a 1/2/4/8 s schedule;
  5. HTTP GET of the script it was pointed at, one `chain` followed (as bootd's menu may chain), then the
     kernel and initrd of the default entry (`goto`/`choose --default` label, else the first lines);
  6. NBD: the export named on the kernel line (`bootd.nbd=HOST:PORT/NAME` or `nbdroot=HOST:PORT/NAME`),
     fixed-newstyle handshake (NBD_OPT_GO, EXPORT_NAME if the server does not know GO), then `nbd_mib` MiB
     read from offset 0 with NBD_CMD_READ requests of `nbd_request` bytes, `nbd_inflight` at a time,
     every reply's handle and error checked; NBD_CMD_DISC at the end.

Sockets are made inside the PC's namespace (setns(2) on the calling thread around socket(2), then back:
a socket stays in the namespace it was made in) and all are driven by the one event loop. `Room` makes
the namespaces quickly (two `ip -batch` runs, then rtnetlink from this process) and removes them all,
also on an exception or Ctrl-C.

    with Room(server_ns="...", bridge="br0", count=500) as room:
        pcs = [SimPC(net) for net in room.nets]
        results = asyncio.run(run_room(pcs))

The PCs' addresses, servers and per-phase times are in each `PCResult`. With `retry_until` (a
time.monotonic() deadline), a PC whose boot fails (server gone: timeout, refused, reset) starts over
from DHCP DISCOVER, as a firmware set to retry network boot would, until it finishes or the deadline
passes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import os
import random
import re
import resource
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bootd.dhcp import codec  # noqa: E402  (the project's DHCP codec, used read-only)

__all__ = ["SimPC", "PCResult", "PCNet", "Room", "run_room", "PHASES", "PhaseError"]

PHASES = ("dhcp", "loader", "ipxe-dhcp", "script", "chain", "kernel", "initrd", "nbd")
CLONE_NEWNET = 0x40000000
ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
DISCARD = bytearray(1 << 20)  # every PC's bulk data is read into this and dropped

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


_HOME_NS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def in_netns(fd: int) -> Iterator[None]:
    """Switch this thread into the network namespace `fd` for the block (no await inside it!)."""
    _setns(fd)
    try:
        yield
    finally:
        _setns(_HOME_NS)


class PhaseError(Exception):
    """A boot phase failed; `phase` is one of PHASES."""

    def __init__(self, phase: str, why: str):
        super().__init__(f"{phase}: {why}")
        self.phase = phase
        self.why = why


# --------------------------------------------------------------------------------------------------
# rtnetlink, the little of it a PC needs (link up, MAC, addresses): no process per namespace

RTM_NEWLINK, RTM_NEWADDR, RTM_DELADDR = 16, 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 1, 4, 0x200, 0x400, 0x100
NLMSG_ERROR = 2


def _rta(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * (-n % 4)


class Netlink:
    """A blocking NETLINK_ROUTE socket (made in a PC's namespace); each request waits for its ACK."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.sock.settimeout(5)
        self.seq = 0

    def request(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        msg = struct.pack("=LHHLL", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if typ == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(-err, f"rtnetlink: {os.strerror(-err)}")
                    return
                off += (ln + 3) & ~3

    def link(self, index: int, up: Optional[bool] = None, mac: Optional[str] = None) -> None:
        flags = change = 0
        if up is not None:
            flags, change = (1 if up else 0), 1  # IFF_UP
        attrs = _rta(1, bytes.fromhex(mac.replace(":", ""))) if mac else b""  # IFLA_ADDRESS
        self.request(RTM_NEWLINK, 0, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change) + attrs)

    def address(self, index: int, addr: str, prefix: int, add: bool = True) -> None:
        a = socket.inet_aton(addr)
        body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, 0, index) + _rta(2, a) + _rta(1, a)
        if add:
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self.request(RTM_DELADDR, 0, body)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------------
# The room: namespaces with a veth on the lab bridge each

@dataclass
class PCNet:
    """One PC's place on the network: its namespace (name, an open fd), interface and MAC."""

    name: str
    fd: int
    ifname: str
    ifindex: int
    mac: str
    nl: Netlink
    addresses: list[tuple[str, int]] = field(default_factory=list)  # what is on the interface now
    packet: Optional[socket.socket] = None  # the DHCP socket, kept for the PC's life (see dhcp_socket)

    def dhcp_socket(self) -> socket.socket:
        """This PC's AF_PACKET socket on its interface, letting in only DHCP replies to its MAC now.
        Made once and kept: closing a packet socket waits for an RCU grace period (synchronize_net(),
        ~13 ms here), which would stall the one event loop of the whole room once per PC."""
        if self.packet is None:
            self.packet = self.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing until bound
            _attach_filter(self.packet, _dhcp_filter(bytes.fromhex(self.mac.replace(":", ""))))
            self.packet.bind((self.ifname, ETH_P_IP))
        else:
            _attach_filter(self.packet, _dhcp_filter(bytes.fromhex(self.mac.replace(":", ""))))
        while True:  # drop what came in before (other boots' replies, or before the filter was on)
            try:
                self.packet.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
        return self.packet

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A non-blocking socket made inside this PC's namespace."""
        with in_netns(self.fd):
            s = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        s.setblocking(False)
        return s

    def set_address(self, addr: Optional[str], prefix: int = 24) -> None:
        """Make `addr`/`prefix` the interface's only IPv4 address (None: none)."""
        for a, p in list(self.addresses):
            if a != addr:
                with contextlib.suppress(OSError):
                    self.nl.address(self.ifindex, a, p, add=False)
                self.addresses.remove((a, p))
        if addr and (addr, prefix) not in self.addresses:
            self.nl.address(self.ifindex, addr, prefix)
            self.addresses.append((addr, prefix))

    def set_mac(self, mac: str) -> None:
        self.nl.link(self.ifindex, mac=mac)
        self.mac = mac


class Room:
    """`count` namespaces, each with `eth0` (a veth whose other end is on `bridge` in `server_ns`), no
    address, IPv6 off (no RS/DAD noise). Use as a context manager: everything goes on exit, whatever
    happened. MACs are 52:54:00:XX:... from `mac_prefix` + a counter; `renew_macs()` gives every PC one
    it never had (a room no server has seen)."""

    def __init__(self, server_ns: str, bridge: str, count: int, mac_prefix: str = "52:54:01"):
        self.server_ns = server_ns
        self.bridge = bridge
        self.count = count
        self.mac_prefix = mac_prefix
        self.macs = 0
        self.tag = f"sp{os.getpid() % 100000}"
        self.names: list[str] = []
        self.nets: list[PCNet] = []

    def next_mac(self) -> str:
        self.macs += 1
        n = self.macs
        return f"{self.mac_prefix}:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"

    def __enter__(self) -> "Room":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, 16 * self.count + 1024))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        names = [f"{self.tag}n{i}" for i in range(self.count)]
        outers = [f"{self.tag}v{i}"[-15:] for i in range(self.count)]
        macs = [self.next_mac() for _ in range(self.count)]
        self.names = names
        batch = "".join(f"netns add {n}\n" for n in names)
        batch += "".join(f"link add {o} netns {self.server_ns} type veth peer name eth0 address {m} netns {n}\n"
                         for n, o, m in zip(names, outers, macs, strict=True))
        r = subprocess.run(["ip", "-batch", "-"], input=batch, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip -batch (namespaces): {r.stderr[-2000:]}")
        ports = "".join(f"link set {o} master {self.bridge}\nlink set {o} up\n" for o in outers)
        r = subprocess.run(["ip", "-n", self.server_ns, "-batch", "-"], input=ports, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip -batch (bridge ports): {r.stderr[-2000:]}")
        for n, m in zip(names, macs, strict=True):
            fd = os.open(f"/run/netns/{n}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with in_netns(fd):
                    nl = Netlink()
                    index = socket.if_nametoindex("eth0")
                    for key in ("eth0", "default"):
                        with contextlib.suppress(OSError):
                            Path(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6").write_text("1")
                    nl.link(socket.if_nametoindex("lo"), up=True)
                    nl.link(index, up=True)
            except BaseException:
                os.close(fd)
                raise
            self.nets.append(PCNet(n, fd, "eth0", index, m, nl))

    def renew_macs(self) -> None:
        """A new MAC and no address for every PC."""
        for net in self.nets:
            net.set_address(None)
            net.set_mac(self.next_mac())

    def close(self) -> None:
        def close_packet(net: PCNet) -> None:  # each waits out an RCU grace period: many at once share them
            if net.packet is not None:
                with contextlib.suppress(OSError):
                    net.packet.close()
                net.packet = None

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(close_packet, self.nets))
        for net in self.nets:
            with contextlib.suppress(OSError):
                net.nl.close()
            with contextlib.suppress(OSError):
                os.close(net.fd)
        self.nets.clear()
        if self.names:
            subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns delete {n}\n" for n in self.names),
                           text=True, capture_output=True)
            self.names = []


# --------------------------------------------------------------------------------------------------
# Frames for DHCP over AF_PACKET

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(src_mac: bytes, payload: bytes) -> bytes:
    """Ethernet broadcast / IPv4 0.0.0.0 -> 255.255.255.255 / UDP 68 -> 67 around a DHCP message."""
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(udp), 0, 0, 64, 17, 0, b"\0" * 4, b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_IP) + ip + udp


def _dhcp_filter(mac: bytes) -> bytes:
    """Classic BPF: IPv4 (no IP options), UDP, destination port 68, DHCP chaddr == mac."""
    hi, lo = struct.unpack("!IH", mac)
    prog = [
        (0x28, 0, 0, 12), (0x15, 0, 9, ETH_P_IP),        # ldh [12]; ethertype IPv4
        (0x30, 0, 0, 14), (0x15, 0, 7, 0x45),            # ldb [14]; version 4, IHL 5
        (0x30, 0, 0, 23), (0x15, 0, 5, 17),              # ldb [23]; UDP
        (0x28, 0, 0, 36), (0x15, 0, 3, 68),              # ldh [36]; dport 68
        (0x20, 0, 0, 70), (0x15, 0, 1, hi),              # ld [70]; chaddr[0:4]
        (0x28, 0, 0, 74), (0x15, 1, 0, lo),              # ldh [74]; chaddr[4:6]
        (0x06, 0, 0, 0),                                 # drop
        (0x06, 0, 0, 0xFFFF),                            # accept
    ]
    drop, accept = len(prog) - 2, len(prog) - 1  # jumps are relative to the next instruction
    fixed = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if code == 0x15:  # jeq: the last one jumps to accept when equal, every one to drop when not
            jt, jf = (accept - i - 1 if i == drop - 1 else 0), drop - i - 1
        fixed.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(fixed)


def _attach_filter(sock: socket.socket, prog: bytes) -> None:
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --------------------------------------------------------------------------------------------------
# Results

@dataclass
class PCResult:
    """What one PC did. Times are seconds since power-on (the room's start)."""

    name: str
    mac: str
    ok: bool = False
    failed_phase: Optional[str] = None       # the phase of the last failure when not ok
    error: str = ""
    marks: dict[str, float] = field(default_factory=dict)  # phase -> time it completed (last attempt)
    address: Optional[str] = None            # the address it booted with (last ACK)
    servers: dict[str, str] = field(default_factory=dict)  # phase -> server address that served it
    offered: list[str] = field(default_factory=list)       # every address offered or given (in order, unique)
    attempts: int = 0                        # boots started (1 + restarts under retry_until)
    failures: list[tuple[str, str, float]] = field(default_factory=list)  # (phase, why, time) of each failure
    nbd_bytes: int = 0
    nbd_export: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------------
# The PC

@dataclass
class SimPC:
    """One simulated BIOS PC (PXE ROM, then iPXE) on `net`.

    `retry_until`: a time.monotonic() deadline; when set, a failed boot (any phase) starts over from
    DHCP DISCOVER until the PC has finished or the deadline has passed. `rom_timeouts` / `ipxe_timeouts`:
    the DHCP resend schedules (seconds to wait after each DISCOVER/REQUEST; the PXE spec's 4/8/16/32 and
    iPXE's 1/2/4/8). `io_timeout`: the longest wait for any TCP progress (connect, a read)."""

    net: PCNet
    nbd_mib: float = 16.0
    nbd_request: int = 256 * 1024
    nbd_inflight: int = 4
    retry_until: Optional[float] = None
    rom_timeouts: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    ipxe_timeouts: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    tftp_timeouts: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    tftp_blksize: int = 1468
    io_timeout: float = 20.0
    result: PCResult = field(init=False)

    def __post_init__(self) -> None:
        self.result = PCResult(name=self.net.name, mac=self.net.mac)
        self.t0 = time.monotonic()
        self.phase = "off"  # the phase under way (what a PC still running at a deadline was doing)
        self.nbd_stage = ""

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _mark(self, phase: str) -> None:
        self.result.marks[phase] = round(self._now(), 4)

    def _saw(self, addr: str) -> None:
        if addr and addr != "0.0.0.0" and addr not in self.result.offered:
            self.result.offered.append(addr)

    async def run(self, t0: Optional[float] = None) -> PCResult:
        """Power on at `t0` (time.monotonic(); default now) and boot; returns the PC's result."""
        self.t0 = t0 if t0 is not None else time.monotonic()
        self.result = PCResult(name=self.net.name, mac=self.net.mac)
        while True:
            self.result.attempts += 1
            self.result.marks = {}
            try:
                await self._boot()
                self.result.ok, self.result.failed_phase, self.result.error = True, None, ""
                return self.result
            except PhaseError as e:
                self.result.failures.append((e.phase, e.why, round(self._now(), 3)))
                self.result.ok, self.result.failed_phase, self.result.error = False, e.phase, e.why
            if self.retry_until is None or time.monotonic() >= self.retry_until:
                return self.result
            await asyncio.sleep(0.5)  # a firmware's reboot into PXE again is not instant either

    async def _boot(self) -> None:
        net = self.net
        net.set_address(None)
        ack = await self._phase("dhcp", self._dhcp(ipxe=False))
        addr, prefix = ack.yiaddr, _prefix(ack)
        self.result.address = addr
        try:
            net.set_address(addr, prefix)
        except OSError as e:
            raise PhaseError("dhcp", f"cannot configure {addr}/{prefix}: {e}") from e
        self._mark("dhcp")
        server = ack.tftp_server or (ack.siaddr if ack.siaddr != "0.0.0.0" else ack.server_id)
        loader = ack.boot_file
        if not server or not loader:
            raise PhaseError("loader", f"no loader in the ACK (server {server!r}, file {loader!r})")
        if "://" in loader:
            raise PhaseError("loader", f"ACK names a URL as the BIOS loader: {loader}")
        await self._phase("loader", self._tftp(server, loader))
        self.result.servers["loader"] = server
        self._mark("loader")
        ack2 = await self._phase("ipxe-dhcp", self._dhcp(ipxe=True))
        if ack2.yiaddr != addr:
            try:
                net.set_address(ack2.yiaddr, _prefix(ack2))
            except OSError as e:
                raise PhaseError("ipxe-dhcp", f"cannot configure {ack2.yiaddr}: {e}") from e
            self.result.address = addr = ack2.yiaddr
        self._mark("ipxe-dhcp")
        url = ack2.boot_file
        if not url.startswith("http://"):
            raise PhaseError("ipxe-dhcp", f"iPXE was not given an http:// script: {url!r}")
        body = await self._phase("script", self._http(url, keep=True))
        self.result.servers["script"] = _host(url)
        self._mark("script")
        text = body.decode("utf-8", "replace")
        chain = _first(text, r"^\s*chain\s+(?:--\S+\s+)*(http://\S+)")
        if chain and not re.search(r"^\s*kernel\s", text, re.M):
            text = (await self._phase("chain", self._http(chain, keep=True))).decode("utf-8", "replace")
            self._mark("chain")
        kernel_line, initrd_url = _default_entry(text)
        if not kernel_line or not initrd_url:
            raise PhaseError("script", "no kernel/initrd in the script")
        kernel_url = _first(kernel_line, r"(http://\S+)")
        if not kernel_url:
            raise PhaseError("script", f"kernel line without an http URL: {kernel_line}")
        await self._phase("kernel", self._http(kernel_url))
        self.result.servers["kernel"] = _host(kernel_url)
        self._mark("kernel")
        await self._phase("initrd", self._http(initrd_url))
        self.result.servers["initrd"] = _host(initrd_url)
        self._mark("initrd")
        m = re.search(r"(?:bootd\.nbd|nbdroot)=([0-9.]+):(\d+)/(\S+)", kernel_line)
        if self.nbd_mib > 0:
            if not m:
                raise PhaseError("nbd", "no bootd.nbd= / nbdroot= on the kernel line")
            host, port, name = m.group(1), int(m.group(2)), m.group(3)
            self.result.nbd_export = f"{host}:{port}/{name}"
            self.nbd_stage = "connect"
            try:
                await self._phase("nbd", self._nbd(host, port, name))
            except PhaseError as e:  # say where it stopped: connect, handshake or reads (n done)
                raise PhaseError("nbd", f"{e.why} (in {self.nbd_stage})") from e
            self.result.servers["nbd"] = host
        self._mark("done")

    async def _phase(self, phase: str, coro: Any) -> Any:
        self.phase = phase
        try:
            return await coro
        except PhaseError:
            raise
        except (OSError, asyncio.TimeoutError, EOFError, ValueError, struct.error) as e:
            why = type(e).__name__ + (f": {e}" if str(e) else "")
            raise PhaseError(phase, why) from e

    # -- DHCP -------------------------------------------------------------------------------------
    def _dhcp_message(self, kind: int, xid: int, ipxe: bool, secs: int, offer: Optional[codec.DhcpMessage]
                      ) -> bytes:
        mac = bytes.fromhex(self.net.mac.replace(":", ""))
        guid = hashlib.md5(mac).digest()
        opts: dict[int, bytes] = {53: bytes([kind])}
        if offer is not None:
            opts[50] = socket.inet_aton(offer.yiaddr)
            if offer.server_id:
                opts[54] = socket.inet_aton(offer.server_id)
        opts[57] = struct.pack("!H", 1472)
        opts[55] = bytes([1, 3, 6, 12, 15, 17, 43, 60, 66, 67, 128, 129, 130, 131, 132, 133, 134, 135, 175, 203])
        opts[60] = b"PXEClient:Arch:00000:UNDI:002001"
        opts[93] = b"\x00\x00"
        opts[94] = b"\x01\x02\x01"
        opts[97] = b"\x00" + guid
        if ipxe:
            opts[77] = b"iPXE"
            opts[175] = bytes([0x13, 1, 1, 0x11, 1, 1, 0x27, 1, 1, 0x10, 1, 2])  # HTTP, PXE ext, BzImage, ..
        msg = codec.DhcpMessage(op=codec.BOOTREQUEST, xid=xid, secs=secs, chaddr=mac + bytes(10), options=opts)
        return _frame(mac, codec.encode(msg, min_size=300))

    async def _dhcp(self, ipxe: bool) -> codec.DhcpMessage:
        phase = "ipxe-dhcp" if ipxe else "dhcp"
        schedule = self.ipxe_timeouts if ipxe else self.rom_timeouts
        loop = asyncio.get_running_loop()
        sock = self.net.dhcp_socket()
        started = time.monotonic()
        xid = random.getrandbits(32)
        offer: Optional[codec.DhcpMessage] = None
        for wait in schedule:
            secs = int(time.monotonic() - started)
            kind = codec.REQUEST if offer is not None else codec.DISCOVER
            await loop.sock_sendall(sock, self._dhcp_message(kind, xid, ipxe, secs, offer))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                try:
                    frame = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                except asyncio.TimeoutError:
                    break
                msg = _parse_reply(frame, xid)
                if msg is None:
                    continue
                mt = msg.message_type
                self._saw(msg.yiaddr)
                if mt == codec.OFFER and offer is None and msg.yiaddr != "0.0.0.0":
                    offer = msg
                    self.result.servers[phase + "-offer"] = msg.server_id or msg.siaddr
                    # REQUEST at once (the ROM does not wait out its timer once it has an offer)
                    secs = int(time.monotonic() - started)
                    await loop.sock_sendall(sock, self._dhcp_message(codec.REQUEST, xid, ipxe, secs, offer))
                    deadline = time.monotonic() + wait
                elif mt == codec.ACK and offer is not None and (
                        not offer.server_id or msg.server_id in (None, offer.server_id)):
                    self.result.servers[phase] = msg.server_id or msg.siaddr
                    return msg
                elif mt == codec.NAK and offer is not None and msg.server_id in (None, offer.server_id):
                    offer = None  # start over with a DISCOVER at the next slot
                    xid = random.getrandbits(32)
                    break
        raise PhaseError(phase, "no ACK after " + "/".join(f"{t:g}" for t in schedule) + " s"
                         + (" (had an offer)" if offer is not None else ""))

    # -- TFTP -------------------------------------------------------------------------------------
    async def _tftp(self, server: str, name: str) -> int:
        loop = asyncio.get_running_loop()
        sock = self.net.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", 0))
            rrq = b"\0\1" + name.encode() + b"\0octet\0"
            if self.tftp_blksize != 512:
                rrq += b"blksize\0" + str(self.tftp_blksize).encode() + b"\0tsize\0" + b"0\0"
            last, dest = rrq, (server, 69)
            tid: Optional[tuple[str, int]] = None
            blksize, expect, total = 512, 1, 0
            tries = 0
            while True:
                await loop.sock_sendto(sock, last, dest)
                try:
                    data, peer = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536),
                                                        self.tftp_timeouts[min(tries, len(self.tftp_timeouts) - 1)])
                except asyncio.TimeoutError:
                    tries += 1
                    if tries >= len(self.tftp_timeouts):
                        raise PhaseError("loader", f"TFTP timeout at block {expect}") from None
                    continue
                if peer[0] != server or (tid is not None and peer != tid):
                    continue
                if len(data) < 4:
                    continue
                op = struct.unpack_from("!H", data)[0]
                if op == 5:
                    text = data[4:].split(b"\0")[0].decode(errors="replace")
                    raise PhaseError("loader", f"TFTP error {struct.unpack_from('!H', data, 2)[0]}: {text}")
                if tid is None:
                    tid, dest = peer, peer
                if op == 6 and expect == 1 and total == 0:  # OACK
                    parts = data[2:].split(b"\0")
                    opts = {parts[i].lower(): parts[i + 1] for i in range(0, len(parts) - 1, 2)}
                    blksize = int(opts.get(b"blksize", b"512"))
                    last = b"\0\4\0\0"
                    tries = 0
                    continue
                if op != 3:
                    continue
                block = struct.unpack_from("!H", data, 2)[0]
                if block == (expect & 0xFFFF):
                    total += len(data) - 4
                    last = b"\0\4" + struct.pack("!H", block)
                    expect += 1
                    tries = 0
                    if len(data) - 4 < blksize:
                        await loop.sock_sendto(sock, last, dest)
                        return total
                # a duplicate or an old block: ACK what we have (resent below)
        finally:
            sock.close()

    # -- HTTP -------------------------------------------------------------------------------------
    async def _connect(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = self.net.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), self.io_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _recv_into(self, sock: socket.socket, buf: memoryview) -> int:
        n = await asyncio.wait_for(asyncio.get_running_loop().sock_recv_into(sock, buf), self.io_timeout)
        return int(n)

    async def _drain(self, sock: socket.socket, n: Optional[int]) -> int:
        """Read and drop `n` bytes (None: up to EOF) and return how many came. The kernel discards them
        without copying (MSG_TRUNC on TCP) and one reader callback takes everything the socket has at
        each wake-up: the room's client, which shares the server's CPUs, stays cheap. Fails after
        `io_timeout` seconds without a byte, and on EOF before `n`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        got = 0
        fd = sock.fileno()

        def ready() -> None:
            nonlocal got
            while n is None or got < n:
                want = len(DISCARD) if n is None else min(len(DISCARD), n - got)
                try:
                    k = sock.recv_into(DISCARD, want, socket.MSG_TRUNC)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    if not fut.done():
                        fut.set_exception(e)
                    loop.remove_reader(fd)
                    return
                if k == 0:
                    if not fut.done():
                        if n is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(EOFError(f"closed after {got} of {n} bytes"))
                    loop.remove_reader(fd)
                    return
                got += k
            if not fut.done():
                fut.set_result(None)
            loop.remove_reader(fd)

        loop.add_reader(fd, ready)
        try:
            ready()
            while not fut.done():
                before = got
                await asyncio.wait([fut], timeout=self.io_timeout)
                if not fut.done() and got == before:
                    raise asyncio.TimeoutError(f"no data for {self.io_timeout} s after {got} bytes")
            fut.result()
            return got
        finally:
            loop.remove_reader(fd)
            if not fut.done():
                fut.cancel()

    async def _http(self, url: str, keep: bool = False) -> bytes:
        """GET `url` (HTTP/1.0: no chunking, the server closes). Returns the body if `keep`, else b""
        (the body is read and dropped, its length checked against Content-Length)."""
        m = re.match(r"http://([^/:]+)(?::(\d+))?(/.*)?$", url)
        if not m:
            raise ValueError(f"bad URL {url}")
        host, port, path = m.group(1), int(m.group(2) or 80), m.group(3) or "/"
        loop = asyncio.get_running_loop()
        sock = await self._connect(host, port)
        try:
            req = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: iPXE/1.0.0 (simpc)\r\n\r\n"
            await loop.sock_sendall(sock, req.encode())
            head = bytearray()
            small = bytearray(65536)
            while b"\r\n\r\n" not in head:
                n = await self._recv_into(sock, memoryview(small))
                if not n:
                    raise EOFError("connection closed in the response head")
                head += small[:n]
                if len(head) > 1 << 20:
                    raise ValueError("response head too long")
            raw, _, rest = bytes(head).partition(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = lines[0].split()
            if len(status) < 2 or status[1] != "200":
                raise ValueError(f"HTTP {' '.join(status[1:])} for {url}")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = int(headers["content-length"]) if "content-length" in headers else None
            body = bytearray(rest) if keep else bytearray()
            got = len(rest)
            if not keep:
                await self._drain(sock, None if length is None else max(0, length - got))
                return b""
            while length is None or got < length:
                n = await self._recv_into(sock, memoryview(small))
                if not n:
                    if length is None:
                        break
                    raise EOFError(f"short body: {got} of {length} bytes")
                body += small[:n]
                got += n
            return bytes(body)
        finally:
            sock.close()

    # -- NBD --------------------------------------------------------------------------------------
    async def _nbd(self, host: str, port: int, name: str) -> None:
        loop = asyncio.get_running_loop()
        sock = await self._connect(host, port)
        try:
            async def exact(n: int) -> bytes:
                buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:
                    k = await self._recv_into(sock, view[got:])
                    if not k:
                        raise EOFError(f"NBD: closed after {got} of {n} bytes")
                    got += k
                return bytes(buf)

            async def drop(n: int) -> None:
                await self._drain(sock, n)

            self.nbd_stage = "handshake"
            magic, opt, hflags = struct.unpack("!8sQH", await exact(18))
            if magic != b"NBDMAGIC" or opt != 0x49484156454F5054:
                raise PhaseError("nbd", f"not a fixed-newstyle NBD server ({magic!r}, {opt:#x})")
            cflags = 1 | (2 if hflags & 2 else 0)  # FIXED_NEWSTYLE, NO_ZEROES if offered
            await loop.sock_sendall(sock, struct.pack("!I", cflags))
            nm = name.encode()
            go = struct.pack("!I", len(nm)) + nm + struct.pack("!H", 0)
            await loop.sock_sendall(sock, struct.pack("!QII", 0x49484156454F5054, 7, len(go)) + go)
            size: Optional[int] = None
            while True:
                rmagic, ropt, rtype, rlen = struct.unpack("!QIII", await exact(20))
                if rmagic != 0x3E889045565A9 or ropt != 7:
                    raise PhaseError("nbd", f"bad option reply {rmagic:#x} opt {ropt}")
                data = await exact(rlen) if rlen else b""
                if rtype == 1:  # ACK
                    break
                if rtype == 3 and len(data) >= 12 and struct.unpack_from("!H", data)[0] == 0:  # INFO_EXPORT
                    size = struct.unpack_from("!Q", data, 2)[0]
                elif rtype == (1 << 31) | 1:  # ERR_UNSUP: an old server; EXPORT_NAME instead
                    await loop.sock_sendall(sock, struct.pack("!QII", 0x49484156454F5054, 1, len(nm)) + nm)
                    size, _tflags = struct.unpack("!QH", await exact(10))
                    if not cflags & 2:
                        await exact(124)
                    break
                elif rtype & (1 << 31):
                    raise PhaseError("nbd", f"NBD_OPT_GO refused for {name}: error {rtype & 0x7FFFFFFF} "
                                     f"{data[:200].decode(errors='replace')}")
            if size is None:
                raise PhaseError("nbd", "no export size in the GO reply")
            total = min(int(self.nbd_mib * 2**20), size)
            reqs = [(off, min(self.nbd_request, total - off)) for off in range(0, total, self.nbd_request)]
            pending: dict[int, int] = {}
            handle = 0
            nxt = 0
            self.nbd_stage = "reads"
            while nxt < len(reqs) or pending:
                while nxt < len(reqs) and len(pending) < self.nbd_inflight:
                    off, ln = reqs[nxt]
                    handle += 1
                    pending[handle] = ln
                    await loop.sock_sendall(sock, struct.pack("!IHHQQI", 0x25609513, 0, 0, handle, off, ln))
                    nxt += 1
                rmagic, err, h = struct.unpack("!IIQ", await exact(16))
                if rmagic != 0x67446698:
                    raise PhaseError("nbd", f"bad reply magic {rmagic:#x} (structured reply not asked for)")
                if h not in pending:
                    raise PhaseError("nbd", f"reply for unknown handle {h}")
                ln = pending.pop(h)
                self.nbd_stage = f"reads, {nxt - len(pending)} of {len(reqs)} answered"
                if err:
                    raise PhaseError("nbd", f"read error {err} ({errno.errorcode.get(err, '?')})")
                await drop(ln)
                self.result.nbd_bytes += ln
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, struct.pack("!IHHQQI", 0x25609513, 0, 2, handle + 1, 0, 0))
        finally:
            sock.close()


def _prefix(msg: codec.DhcpMessage) -> int:
    mask = msg.options.get(1)
    if mask and len(mask) == 4:
        return ipaddress.IPv4Network(f"0.0.0.0/{socket.inet_ntoa(mask)}").prefixlen
    return 24


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


def _first(text: str, pattern: str) -> Optional[str]:
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else None


def _default_entry(script: str) -> tuple[Optional[str], Optional[str]]:
    """The kernel line and initrd URL of the entry the script boots without a key pressed: the label
    of `choose --default X` or of the first `goto X` before any label body; else the first ones."""
    lines = [ln.strip() for ln in script.splitlines()]
    target = None
    for ln in lines:
        m = re.match(r"choose\s.*--default\s+(\S+)", ln)
        if m:
            target = m.group(1)
            break
        m = re.match(r"goto\s+(\S+)$", ln)
        if m:
            target = m.group(1)
            break
    body = lines
    if target:
        try:
            start = lines.index(f":{target}") + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith(":")), len(lines))
            body = lines[start:end]
        except ValueError:
            body = lines
    kernel = next((ln for ln in body if ln.startswith("kernel") and "http://" in ln), None)
    initrd_line = next((ln for ln in body if ln.startswith("initrd") and "http://" in ln), None)
    initrd = _first(initrd_line, r"(http://\S+)") if initrd_line else None
    if kernel is None and body is not lines:
        return _default_entry_first(lines)
    return kernel, initrd


def _default_entry_first(lines: list[str]) -> tuple[Optional[str], Optional[str]]:
    kernel = next((ln for ln in lines if ln.startswith("kernel") and "http://" in ln), None)
    initrd_line = next((ln for ln in lines if ln.startswith("initrd") and "http://" in ln), None)
    return kernel, (_first(initrd_line, r"(http://\S+)") if initrd_line else None)


def _parse_reply(frame: bytes, xid: int) -> Optional[codec.DhcpMessage]:
    if len(frame) < 42 + 240:
        return None
    try:
        msg = codec.decode(frame[42:])
    except codec.DhcpDecodeError:
        return None
    if msg.op != codec.BOOTREPLY or msg.xid != xid:
        return None
    return msg


async def run_room(pcs: list[SimPC], start_together: bool = True, stagger: float = 0.0,
                   timeout: Optional[float] = None) -> list[PCResult]:
    """Power on every PC and wait until each has finished or given up; results in the order of `pcs`.
    `start_together`: one power-on time for all (t0 of every result is the same instant); else each PC
    starts `stagger` seconds after the one before (time still counted from its own power-on).
    `timeout`: seconds after which PCs still booting are stopped and reported failed in the phase they
    were in (error "hung")."""
    t0 = time.monotonic()

    async def one(i: int, pc: SimPC) -> PCResult:
        start = t0
        if not start_together:
            start = t0 + i * stagger
            await asyncio.sleep(max(0.0, start - time.monotonic()))
        try:
            return await pc.run(start)
        except Exception as e:  # a bug in the client must not pass for a server failure: say it loudly
            pc.result.ok, pc.result.failed_phase = False, "client-bug"
            pc.result.error = f"{type(e).__name__}: {e}"
            return pc.result

    tasks = [asyncio.ensure_future(one(i, pc)) for i, pc in enumerate(pcs)]
    try:
        await asyncio.wait(tasks, timeout=timeout)
    finally:
        for task, pc in zip(tasks, pcs, strict=True):
            if not task.done():
                task.cancel()
                pc.result.ok, pc.result.failed_phase = False, pc.phase
                pc.result.error = f"hung (still in {pc.phase} after {timeout} s)"
        await asyncio.gather(*tasks, return_exceptions=True)
    return [pc.result for pc in pcs]
