"""A sleeping PC's NIC, as far as Wake-on-LAN goes: reads every frame on an interface (AF_PACKET, no IP
needed) and prints one JSON line per frame that carries a magic packet: the MAC it wakes, the kernel's
receive time, the frame's destination and, for UDP, the port. Runs inside a test's client namespace
until killed; prints "ready" once it listens."""
from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.wake import parse_magic  # noqa: E402

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interface", default="eth0")
    args = ap.parse_args()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((args.interface, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    print("ready", flush=True)
    while True:
        frame, ancdata, _, addr = sock.recvmsg(65536, socket.CMSG_SPACE(16))
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        mac = parse_magic(frame[14:])
        if mac is None:
            continue
        stamp = None
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", data[:16])
                stamp = sec + nsec / 1e9
        ethertype = struct.unpack("!H", frame[12:14])[0]
        port = None
        if ethertype == 0x0800 and frame[14 + 9] == 17:  # IPv4, UDP
            ihl = (frame[14] & 0x0F) * 4
            port = struct.unpack("!H", frame[14 + ihl + 2:14 + ihl + 4])[0]
        print(json.dumps({"mac": mac, "ts": stamp, "dst": frame[0:6].hex(":"), "ethertype": ethertype,
                          "udp_port": port}), flush=True)


if __name__ == "__main__":
    main()
