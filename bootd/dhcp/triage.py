"""Which of the DHCP packets read in one go still deserve an answer, and in which order (issue 22).

When a room is switched on, the server's CPU is shared with everything else and requests wait in the
socket queue. A client that has waited past its retry interval has already sent the same request again,
so answering the old copy first only delays the new one behind work nobody waits for. So, before any
decoding: the newest packets go first; a DISCOVER or REQUEST that the same client (chaddr) has since
followed with a newer packet is skipped ("superseded": its reply would carry a transaction the client
has left); a DISCOVER, REQUEST or INFORM older than `stale_after` seconds is skipped ("stale": its
client has retried or given up). A RELEASE or DECLINE is never skipped: it asks for no answer, but it
says something about an address (free again, in use by someone else) however late it is read.
Pure functions, no I/O: the caller gives the arrival times (the kernel's receive timestamps) and the
clock.
"""
from __future__ import annotations

from dataclasses import dataclass

DHCP_MAGIC = b"\x63\x82\x53\x63"
OPTIONS_AT = 240  # the BOOTP header (236 bytes) and the magic cookie
SUPERSEDABLE = frozenset({1, 3})  # DISCOVER, REQUEST: a newer packet from the client replaces them
KEPT = frozenset({4, 7})  # DECLINE, RELEASE: state news, never skipped


@dataclass(slots=True)
class Received:
    """One datagram as read: payload, source address, arrival time (wall clock, seconds)."""

    data: bytes
    src: tuple[str, int]
    at: float


def message_type(data: bytes) -> int | None:
    """Option 53 of a raw packet, found by walking the options without decoding them; None when it is
    missing or the packet is malformed (decode() says why later)."""
    n = len(data)
    if n < OPTIONS_AT + 3 or data[236:240] != DHCP_MAGIC:
        return None
    i = OPTIONS_AT
    while i + 1 < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            return None
        length = data[i + 1]
        if code == 53:
            return data[i + 2] if length == 1 and i + 2 < n else None
        i += 2 + length
    return None


def triage(packets: list[Received], now: float, stale_after: float) -> tuple[list[Received], int, int]:
    """`packets` in arrival order -> (the ones to answer, newest first; how many were stale; how many
    were superseded)."""
    keep: list[Received] = []
    seen: set[bytes] = set()
    stale = superseded = 0
    for p in reversed(packets):
        mtype = message_type(p.data)
        if now - p.at > stale_after and mtype not in KEPT:
            stale += 1
            continue
        chaddr = p.data[28:44]
        if chaddr in seen:
            if mtype in SUPERSEDABLE:
                superseded += 1
                continue
        else:
            seen.add(chaddr)
        keep.append(p)
    return keep, stale, superseded
