"""A minimal IPv6 router advertisement responder for the served interfaces.

Stock iPXE waits ~15 s for a router advertisement before it gives up on IPv6 and goes on booting;
any RA ends the wait. This answers each router solicitation with an RA that announces nothing:
router lifetime 0 (not a default router), no prefixes, only our link-layer address. Hosts therefore
configure nothing from it. Rate-limited per interface so a room booting at once cannot make it flood.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Optional

from bootd.metrics import Metrics

log = logging.getLogger("bootd.ra")

ICMP6_FILTER = 1
RS, RA = 133, 134
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
MIN_INTERVAL = 0.05  # seconds between RAs on one interface (a burst of solicitations gets one RA)


def build_ra(mac: Optional[bytes]) -> bytes:
    """ICMPv6 RA (checksum left 0: the kernel fills it in for raw ICMPv6 sockets)."""
    body = struct.pack("!BBHBBHII", RA, 0, 0, 64, 0, 0, 0, 0)  # hop limit 64, no flags, lifetime 0
    if mac and len(mac) == 6:
        body += struct.pack("!BB6s", 1, 1, mac)  # source link-layer address option
    return body


def parse_rs(data: bytes) -> bool:
    return len(data) >= 8 and data[0] == RS and data[1] == 0


def _mac_of(ifname: str) -> Optional[bytes]:
    try:
        with open(f"/sys/class/net/{ifname}/address") as f:
            return bytes.fromhex(f.read().strip().replace(":", ""))
    except (OSError, ValueError):
        return None


class RouterAdvertiser:
    """Raw ICMPv6 sockets (one per interface, bound to it) that answer RS with a null RA."""

    def __init__(self, interfaces: list[str], metrics: Optional[Metrics] = None) -> None:
        self.interfaces = list(interfaces)
        self.metrics = metrics
        self.socks: dict[str, tuple[socket.socket, int]] = {}
        self.last_sent: dict[str, float] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task[None]] = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.sync()
        self._task = loop.create_task(self._resync())

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop sockets are registered on; sockets exist only after start()."""
        if self._loop is None:
            raise RuntimeError("RouterAdvertiser used before start()")
        return self._loop

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for name in list(self.socks):
            self._close(name)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                self.sync()
            except Exception as e:
                log.error("ra: %s", e)

    def sync(self) -> None:
        for name in self.interfaces:
            try:
                idx = socket.if_nametoindex(name)
            except OSError:
                idx = None
            cur = self.socks.get(name)
            if cur is not None and cur[1] != idx:
                self._close(name)
                cur = None
            if cur is None and idx is not None:
                try:
                    self._open(name, idx)
                except OSError as e:
                    log.warning("ra: cannot listen on %s: %s", name, e)

    def _open(self, name: str, idx: int) -> None:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.setsockopt(socket.SOL_SOCKET, 25, name.encode())  # SO_BINDTODEVICE
            filt = [0xFFFFFFFF] * 8
            filt[RS >> 5] &= ~(1 << (RS & 31))
            s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *filt))
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("=I", idx))
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.socks[name] = (s, idx)
        self._event_loop().add_reader(s.fileno(), self._on_readable, name)
        log.info("ra: answering router solicitations on %s", name)

    def _close(self, name: str) -> None:
        cur = self.socks.pop(name, None)
        if cur is None:
            return
        try:
            self._event_loop().remove_reader(cur[0].fileno())
        except (ValueError, OSError):
            pass
        cur[0].close()

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("ra", what)

    def _on_readable(self, name: str) -> None:
        cur = self.socks.get(name)
        if cur is None:
            return
        s, idx = cur
        for _ in range(32):
            try:
                data, _src = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not parse_rs(data):
                self._count("ignored")
                continue
            self._count("solicitations")
            now = time.monotonic()
            if now - self.last_sent.get(name, 0.0) < MIN_INTERVAL:
                self._count("rate_limited")
                continue
            self.last_sent[name] = now
            try:
                s.sendto(build_ra(_mac_of(name)), (ALL_NODES, 0, 0, idx))
                self._count("sent")
            except OSError as e:
                log.debug("ra: cannot send on %s: %s", name, e)
                self._count("send_errors")
