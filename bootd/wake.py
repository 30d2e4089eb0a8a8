"""Wake-on-LAN: magic packets for lab PCs, sent on the served interface the PC is on, at a paced rate.

A magic packet is 6 bytes 0xFF then the target MAC 16 times; a sleeping NIC looks for that pattern
anywhere in a frame it receives. bootd sends it as a UDP datagram to the served interface's broadcast
address (port `wake.port`, 9 by default) from a socket bound to that interface (SO_BINDTODEVICE), so it
leaves as an Ethernet broadcast on exactly that link. *Why UDP, not a raw 0x0842 frame:* every served
interface has an address (the config requires one), so the broadcast needs no AF_PACKET socket, the
kernel builds the frame, and site firewalls and counters see ordinary UDP/9 as from `wakeonlan`; a
sleeping NIC matches the pattern in either.

Which interface: the one whose subnet holds the host's configured `ip`, else one of its bound leases;
a host with neither (or an address behind a relay) gets a packet on every served interface.

Pacing: one queue for the whole daemon, drained by one asyncio task that sends at most `wake.rate`
packets a second (a room of 300 at 20/s takes 15 s instead of one burst). A wake request returns a
job at once; its progress is read with `WakeQueue.job(id)`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from bootd.macaddr import normalize_mac

if TYPE_CHECKING:
    from bootd.config import Config
    from bootd.daemon import Context

log = logging.getLogger("bootd.wake")

MAGIC_PREFIX = b"\xff" * 6
MAGIC_LEN = 6 + 16 * 6
KEEP_JOBS = 50  # finished jobs remembered for `bootctl wake` status


def magic_packet(mac: str) -> bytes:
    """The 102-byte magic packet for `mac` (any spelling normalize_mac accepts)."""
    return MAGIC_PREFIX + bytes.fromhex(normalize_mac(mac).replace(":", "")) * 16


def parse_magic(payload: bytes) -> Optional[str]:
    """The MAC a magic packet wakes (the pattern anywhere in `payload`, as a NIC looks for it), or None."""
    start = payload.find(MAGIC_PREFIX)
    while start != -1:
        body = payload[start + 6:start + MAGIC_LEN]
        # the MAC itself may start with 0xff bytes: try every run of 0xff as the prefix
        if len(body) == 96 and body == body[:6] * 16 and body[:6] != b"\xff" * 6:
            return ":".join(f"{b:02x}" for b in body[:6])
        start = payload.find(MAGIC_PREFIX, start + 1)
    return None


@dataclass(frozen=True)
class WakeTarget:
    """One packet to send: `mac` on interface `interface` to `broadcast`."""

    name: Optional[str]
    mac: str
    interface: str
    broadcast: str


def _broadcast_of(network: ipaddress.IPv4Network) -> str:
    """The link's broadcast address; a /31 or /32 has none of its own, so the limited broadcast."""
    return str(network.broadcast_address) if network.prefixlen < 31 else "255.255.255.255"


def plan_targets(config: "Config", name: Optional[str], mac: str, addresses: list[str]) -> list[WakeTarget]:
    """The packets that wake one host: on the served interface whose subnet holds the first of
    `addresses` (configured ip first, then leases) that any interface holds, else on every served one."""
    mac = normalize_mac(mac)
    for address in addresses:
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            continue
        for iface in config.interfaces:
            if ip in iface.address.network:
                return [WakeTarget(name, mac, iface.name, _broadcast_of(iface.address.network))]
    return [WakeTarget(name, mac, iface.name, _broadcast_of(iface.address.network)) for iface in config.interfaces]


@dataclass
class WakeJob:
    """One wake request: what it sends and how far it got."""

    id: int
    created: float
    targets: list[WakeTarget]
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    finished: Optional[float] = None

    def as_dict(self, rate: float) -> dict[str, Any]:
        left = len(self.targets) - self.sent - len(self.errors)
        return {
            "id": self.id, "created": self.created, "finished": self.finished,
            "state": "done" if self.finished is not None else "sending",
            "hosts": sorted({t.mac for t in self.targets}), "packets": len(self.targets),
            "sent": self.sent, "failed": len(self.errors), "errors": self.errors[-20:],
            "rate": rate, "left": left,
            "targets": [{"name": t.name, "mac": t.mac, "interface": t.interface, "broadcast": t.broadcast}
                        for t in self.targets],
        }


class WakeQueue:
    """The daemon's one wake-packet queue and the task that drains it at `ctx.config.wake.rate`."""

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self._ids = itertools.count(1)
        self._jobs: "OrderedDict[int, WakeJob]" = OrderedDict()
        self._pending: deque[tuple[WakeJob, WakeTarget]] = deque()
        self._task: Optional[asyncio.Task[None]] = None
        self._next_send = 0.0  # monotonic time before which no packet may leave (the pacing)
        ctx.metrics.add_gauges("wake", lambda: {"queued": float(len(self._pending))})

    @property
    def rate(self) -> float:
        return self.ctx.config.wake.rate

    def submit(self, targets: list[WakeTarget]) -> WakeJob:
        """Queue the packets of one request; the sender task starts if it is not running."""
        job = WakeJob(next(self._ids), time.time(), list(targets))
        self._jobs[job.id] = job
        while len(self._jobs) > KEEP_JOBS:
            oldest = next(iter(self._jobs.values()))
            if oldest.finished is None:
                break
            self._jobs.popitem(last=False)
        self._pending.extend((job, t) for t in job.targets)
        if not job.targets:
            job.finished = time.time()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="bootd-wake")
        return job

    def job(self, job_id: int) -> Optional[WakeJob]:
        return self._jobs.get(job_id)

    def pending(self) -> int:
        return len(self._pending)

    async def _drain(self) -> None:
        """Send queued packets one by one, `1/rate` seconds apart (over requests too), then end."""
        loop = asyncio.get_running_loop()
        sockets: dict[str, socket.socket] = {}
        try:
            while self._pending:
                delay = self._next_send - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                job, target = self._pending.popleft()
                self._next_send = time.monotonic() + 1.0 / self.rate
                try:
                    sock = sockets.get(target.interface)
                    if sock is None:
                        sock = sockets[target.interface] = _interface_socket(target.interface)
                    address = (target.broadcast, self.ctx.config.wake.port)
                    await loop.sock_sendto(sock, magic_packet(target.mac), address)
                except OSError as e:
                    job.errors.append(f"{target.mac} on {target.interface}: {e.strerror or e}")
                    self.ctx.metrics.inc("wake", "errors", interface=target.interface)
                    log.warning("wake: cannot send to %s on %s: %s", target.mac, target.interface, e)
                    broken = sockets.pop(target.interface, None)
                    if broken is not None:
                        broken.close()
                else:
                    job.sent += 1
                    self.ctx.metrics.inc("wake", "sent", interface=target.interface)
                if job.sent + len(job.errors) == len(job.targets):
                    job.finished = time.time()
                    log.info("wake job %d: %d packet(s) sent, %d failed", job.id, job.sent, len(job.errors))
        finally:
            for sock in sockets.values():
                sock.close()


def _interface_socket(ifname: str) -> socket.socket:
    """A non-blocking UDP socket that may broadcast and sends only out of `ifname`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def wake_queue(ctx: "Context") -> WakeQueue:
    """The daemon's WakeQueue, made on first use (it lives as long as the context)."""
    if ctx.wake_queue is None:
        ctx.wake_queue = WakeQueue(ctx)
    return ctx.wake_queue
