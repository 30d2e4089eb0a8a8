"""Who is connected to the NBD port right now, from the kernel's TCP table (/proc/net/tcp*).

qemu-storage-daemon 7.2 has no QMP command listing NBD clients, so "connected" is an established TCP
connection to the NBD port from the address the host last had (its lease)."""
from __future__ import annotations

import ipaddress
import socket
import struct


def _addr(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    words = struct.unpack(">4I", raw)
    addr = socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words))
    ip = ipaddress.IPv6Address(addr)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else addr


def peers(port: int, pid: int | None = None) -> dict[str, int]:
    """{remote address: number of established connections to local `port`} in the caller's netns
    (or in the net namespace of `pid`)."""
    out: dict[str, int] = {}
    base = f"/proc/{pid}/net" if pid else "/proc/net"
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{base}/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state = parts[1], parts[2], parts[3]
                    if state != "01":  # ESTABLISHED
                        continue
                    if int(local.rsplit(":", 1)[1], 16) != port:
                        continue
                    ip = _addr(remote.rsplit(":", 1)[0], v6)
                    out[ip] = out.get(ip, 0) + 1
        except (OSError, StopIteration):
            continue
    return out
