"""Another DHCP server on a served interface: found by asking, like a PC would.

Two DHCP servers on one segment hand PCs to whichever answers first: half a room boots, the other
half gets a home router's address and no boot file. At start and on reload (config
`dhcp.detect_other_servers`, full mode) bootd sends one DISCOVER per served interface (a random
locally administered MAC, broadcast flag) from port 68 and listens PROBE_WAIT seconds for OFFERs; an
OFFER from an address that is not bootd's own is another server. bootd's own DHCP server ignores
these probes (`is_probe`), so they leave no lease, offer or host behind.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

from bootd.dhcp.codec import BOOTREPLY, DISCOVER, OFFER, DhcpDecodeError, DhcpMessage, decode, encode

log = logging.getLogger("bootd.dhcp")

CLIENT_PORT = 68
SERVER_PORT = 67
# seconds to listen for offers after the DISCOVER: dnsmasq (and ISC dhcpd with ping-check) first pings
# the address it will offer and waits up to 3 s for an echo, so a 2 s wait misses them
PROBE_WAIT = 4.0
_probe_macs: set[bytes] = set()  # chaddr of probes in flight: bootd's own server leaves them alone


def is_probe(packet: bytes) -> bool:
    """The packet is one of bootd's own probes (looped back to its own DHCP server): its chaddr, at
    offset 28 of the BOOTP header, is a probe's MAC. Checked before decoding: it is not a PC's."""
    return bool(_probe_macs) and packet[28:34] in _probe_macs


@dataclass(frozen=True)
class OtherServer:
    """An OFFER that was not bootd's: who sent it, and what it offered."""

    interface: str
    server: str  # its server identifier (option 54), else the packet's source address
    offered: str

    def __str__(self) -> str:
        return f"another DHCP server answers on {self.interface}: {self.server} (offered {self.offered})"


def _discover(mac: bytes, xid: int) -> bytes:
    msg = DhcpMessage(xid=xid, flags=0x8000, chaddr=mac,
                      options={53: bytes([DISCOVER]), 55: bytes([1, 3, 6, 54]), 61: b"\x01" + mac})
    return encode(msg, 300)


def _socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind(("0.0.0.0", CLIENT_PORT))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def probe(ifname: str, own: set[str], wait: float = PROBE_WAIT) -> list[OtherServer]:
    """Send one DISCOVER on `ifname` and return the other servers that offered within `wait` seconds
    (OSError when the interface cannot be probed: absent, or port 68 taken by a DHCP client there)."""
    loop = asyncio.get_running_loop()
    mac = bytes([0x02]) + os.urandom(5)
    xid = int.from_bytes(os.urandom(4), "big")
    sock = _socket(ifname)
    found: dict[str, OtherServer] = {}
    _probe_macs.add(mac)
    try:
        await loop.sock_sendto(sock, _discover(mac, xid), ("255.255.255.255", SERVER_PORT))
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            try:
                data, src = await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), left)
            except asyncio.TimeoutError:
                break
            try:
                msg = decode(data)
            except DhcpDecodeError:
                continue
            if msg.op != BOOTREPLY or msg.xid != xid or msg.chaddr[:6] != mac or msg.message_type != OFFER:
                continue
            server = msg.server_id or src[0]
            if server in own or src[0] in own:
                continue
            found.setdefault(server, OtherServer(ifname, server, msg.yiaddr))
    finally:
        _probe_macs.discard(mac)
        sock.close()
    return list(found.values())


async def probe_all(interfaces: dict[str, str], wait: float = PROBE_WAIT) -> tuple[list[OtherServer], list[str]]:
    """Probe every interface (name -> bootd's address on it) at once: (other servers, interfaces that
    could not be probed and why)."""
    own = set(interfaces.values())
    results = await asyncio.gather(*(probe(name, own, wait) for name in interfaces), return_exceptions=True)
    others: list[OtherServer] = []
    problems: list[str] = []
    for name, res in zip(interfaces, results, strict=True):
        if isinstance(res, BaseException):
            if not isinstance(res, OSError):
                raise res
            problems.append(f"cannot look for other DHCP servers on {name}: {res}")
        else:
            others += res
    return others, problems
