"""A plain-socket DHCP client for tests, run inside a client namespace that has a static address.

    python udpclient.py --mac 52:54:00:aa:00:01 --rounds 50 [--pxe-arch 7] [--ipxe] [--interval 0.05]

Each round does DISCOVER -> OFFER -> REQUEST -> ACK with the broadcast flag set (so replies reach the
UDP socket on port 68) and prints one JSON line per round: {"offer": ip|null, "ack": ip|null, "file": ..}.
It uses bootd's codec only to build and read messages; the server under test is reached over the wire.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from bootd.dhcp.codec import DhcpDecodeError, DhcpMessage, decode, encode  # noqa: E402


def wait_for(sock: socket.socket, xid: int, mtypes: set[int], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(4096)
        except socket.timeout:
            return None
        try:
            m = decode(data)
        except DhcpDecodeError:
            continue
        if m.op == 2 and m.xid == xid and m.message_type in mtypes:
            return m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mac", required=True)
    ap.add_argument("--ifname", default="eth0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--pxe-arch", type=int, default=None)
    ap.add_argument("--ipxe", action="store_true")
    ap.add_argument("--duration", type=float, default=0.0, help="keep going at least this long")
    a = ap.parse_args()
    chaddr = bytes.fromhex(a.mac.replace(":", ""))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, a.ifname.encode())
    s.bind(("0.0.0.0", 68))
    extra: dict[int, bytes] = {}
    if a.pxe_arch is not None:
        extra[60] = f"PXEClient:Arch:{a.pxe_arch:05d}:UNDI:002001".encode()
        extra[93] = a.pxe_arch.to_bytes(2, "big")
    if a.ipxe:
        extra[77] = b"iPXE"
        extra[175] = b"\xb1\x05\x01\x80\x86\x10\x0e"
    start = time.monotonic()
    i = 0
    while i < a.rounds or time.monotonic() - start < a.duration:
        xid = (os.getpid() << 12 ^ i) & 0xFFFFFFFF
        i += 1
        disc = DhcpMessage(xid=xid, flags=0x8000, chaddr=chaddr, options={53: b"\x01", **extra})
        s.sendto(encode(disc), ("255.255.255.255", 67))
        off = wait_for(s, xid, {2}, a.timeout)
        res = {"offer": off.yiaddr if off else None, "ack": None, "file": off.boot_file if off else None}
        if off is not None:
            req = DhcpMessage(xid=xid, flags=0x8000, chaddr=chaddr,
                              options={53: b"\x03", 50: socket.inet_aton(off.yiaddr), 54: off.options[54], **extra})
            s.sendto(encode(req), ("255.255.255.255", 67))
            ack = wait_for(s, xid, {5, 6}, a.timeout)
            if ack is not None:
                res["ack"] = ack.yiaddr if ack.message_type == 5 else "NAK"
        print(json.dumps(res), flush=True)
        if a.interval:
            time.sleep(a.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
