"""The kernel's IPv4 neighbour (ARP) table of bootd's network namespace, read over rtnetlink.

/proc/net/arp has no state and no age: an entry of a machine that left an hour ago looks like one that
answered a second ago. rtnetlink (RTM_GETNEIGH dump) gives both, so only a *fresh* entry is taken as
"this MAC is at this address now" (bootd/peers.py):

  * REACHABLE, DELAY, PROBE: the kernel confirmed the MAC within its reachable time, or is using the
    entry right now and re-checking it; PERMANENT: set by an admin (or bootd's DHCP server);
  * STALE: only while the MAC was learned or confirmed within STALE_FRESH seconds (the kernel's default
    gc_stale_time). A machine that sends bootd anything first ARPs for bootd's address, which renews
    the entry with its own MAC, so a live client is never stale for long;
  * INCOMPLETE, FAILED, NOARP, NONE: never.

Ages come from NDA_CACHEINFO (clock ticks since the entry was last confirmed / updated). Every lookup
reads the kernel's table afresh (one dump, only the asked address parsed): a cached copy would judge a
machine that has just taken an address by the entry of the machine that had it before.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("bootd.neighbours")

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NDA_DST, NDA_LLADDR, NDA_CACHEINFO = 1, 2, 3
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY = 0x01, 0x02, 0x04, 0x08
NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x10, 0x20, 0x40, 0x80
STATE_NAMES = {NUD_INCOMPLETE: "incomplete", NUD_REACHABLE: "reachable", NUD_STALE: "stale",
               NUD_DELAY: "delay", NUD_PROBE: "probe", NUD_FAILED: "failed", NUD_NOARP: "noarp",
               NUD_PERMANENT: "permanent"}
CONFIRMED = NUD_REACHABLE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
STALE_FRESH = 60.0  # seconds a STALE entry's MAC still counts (the kernel's default gc_stale_time)

_NLMSGHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_RTATTR = struct.Struct("=HH")
_CACHEINFO = struct.Struct("=IIII")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Neighbour:
    ip: str
    mac: str
    state: int
    ifindex: int
    age: float  # seconds since the kernel last learned or confirmed this MAC for the address

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, hex(self.state))

    @property
    def fresh(self) -> bool:
        if self.mac == "00:00:00:00:00:00":
            return False
        if self.state & CONFIRMED:
            return True
        return bool(self.state & NUD_STALE) and self.age <= STALE_FRESH


def parse_dump(data: bytes, want: Optional[bytes] = None) -> tuple[list[Neighbour], bool]:
    """Neighbours in one recv() of an RTM_GETNEIGH dump (only those for the 4-byte address `want` when
    given); True once NLMSG_DONE (or an error) was seen."""
    out: list[Neighbour] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            return out, True  # truncated: take what was whole
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            return out, True
        if mtype == RTM_NEWNEIGH and length >= _NLMSGHDR.size + _NDMSG.size:
            n = _parse_neigh(data[off + _NLMSGHDR.size:off + length], want)
            if n is not None:
                out.append(n)
        off += (length + 3) & ~3
    return out, False


def _parse_neigh(msg: bytes, want: Optional[bytes] = None) -> Optional[Neighbour]:
    family, _p1, _p2, ifindex, state, _flags, _type = _NDMSG.unpack_from(msg, 0)
    if family != socket.AF_INET:
        return None
    ip = mac = None
    age = float("inf")
    off = _NDMSG.size
    while off + _RTATTR.size <= len(msg):
        alen, atype = _RTATTR.unpack_from(msg, off)
        if alen < _RTATTR.size:
            break
        value = msg[off + _RTATTR.size:off + alen]
        if atype == NDA_DST and len(value) == 4:
            if want is not None and value != want:
                return None
            ip = socket.inet_ntoa(value)
        elif atype == NDA_LLADDR and len(value) == 6:
            mac = ":".join(f"{b:02x}" for b in value)
        elif atype == NDA_CACHEINFO and len(value) >= _CACHEINFO.size:
            confirmed, _used, updated, _refcnt = _CACHEINFO.unpack_from(value, 0)
            age = min(confirmed, updated) / _TICKS
        off += (alen + 3) & ~3
    if ip is None or mac is None:
        return None
    return Neighbour(ip, mac, state, ifindex, age)


def read_neighbours(ip: Optional[str] = None) -> list[Neighbour]:
    """The IPv4 neighbour entries of this network namespace (only `ip`'s when given; one per interface);
    an empty list if netlink fails."""
    try:
        want = socket.inet_aton(ip) if ip is not None else None
    except OSError:
        return []
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    except OSError as e:
        log.debug("rtnetlink: %s", e)
        return []
    out: list[Neighbour] = []
    try:
        s.settimeout(1.0)
        s.bind((0, 0))
        req = _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0)
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        done = False
        while not done:
            got, done = parse_dump(s.recv(1 << 16), want)
            out.extend(got)
    except OSError as e:
        log.debug("rtnetlink neighbour dump: %s", e)
    finally:
        s.close()
    return out


class NeighbourTable:
    """IP -> the kernel's neighbour entries for it, read at each lookup."""

    def entries(self, ip: str) -> list[Neighbour]:
        """All entries for `ip` (one per interface), fresh or not."""
        return read_neighbours(ip)

    def fresh_macs(self, ip: str) -> set[str]:
        """MACs the kernel currently maps `ip` to (normally one; two means two machines answer)."""
        return {n.mac for n in self.entries(ip) if n.fresh}

    def lookup(self, ip: str) -> Optional[str]:
        """The one fresh MAC at `ip`, else None (none, or several)."""
        macs = self.fresh_macs(ip)
        return next(iter(macs)) if len(macs) == 1 else None
