"""Raw UDP helpers run inside a client namespace by the TFTP tests (a misbehaving client on purpose).

    python udp_tool.py rrq HOST PORT HEX [HEX...]     send each datagram from a fresh port, print
                                                      the first reply of each as JSON lines
    python udp_tool.py silent HOST PORT NAME WAIT [OPTION=VALUE...]
                                                      RRQ (with these options), then never ACK; print
                                                      every reply as [time, opcode]
    python udp_tool.py fuzz HOST PORT COUNT SEED      send COUNT mutated/random datagrams to the listener
                                                      and to random ports; print how many were sent
"""
from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time


def _reply(sock: socket.socket, timeout: float) -> dict:
    sock.settimeout(timeout)
    try:
        data, addr = sock.recvfrom(65536)
    except socket.timeout:
        return {"reply": None}
    op = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    out = {"reply": op, "from_port": addr[1], "len": len(data)}
    if op == 5:
        out["code"] = struct.unpack("!H", data[2:4])[0]
        out["message"] = data[4:].split(b"\0")[0].decode(errors="replace")
    elif op == 3:
        out["block"] = struct.unpack("!H", data[2:4])[0]
        out["payload"] = data[4:64].hex()
    return out


def rrq(host: str, port: int, payloads: list[bytes]) -> None:
    for p in payloads:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(p, (host, port))
        print(json.dumps(_reply(s, 3.0)), flush=True)
        s.close()


def silent(host: str, port: int, name: str, wait: float, options: list[str]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    opts = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in (o.split("=", 1) for o in options))
    s.sendto(b"\x00\x01" + name.encode() + b"\0octet\0" + opts, (host, port))
    end = time.monotonic() + wait
    replies = []
    while time.monotonic() < end:
        r = _reply(s, max(0.01, end - time.monotonic()))
        if r["reply"] is None:
            break
        replies.append([round(time.monotonic(), 3), r["reply"]])
        if r["reply"] == 5:
            break
    print(json.dumps(replies), flush=True)


def mutations(rng: random.Random):
    seeds = [
        b"\x00\x01vmlinuz\x00octet\x00", b"\x00\x01f1m\x00octet\x00blksize\x001468\x00tsize\x000\x00",
        b"\x00\x01pxelinux.cfg/default\x00netascii\x00windowsize\x0016\x00", b"\x00\x02up\x00octet\x00",
        b"\x00\x04\x00\x01", b"\x00\x03\x00\x01" + b"x" * 512, b"\x00\x05\x00\x01oops\x00",
        b"\x00\x06blksize\x001468\x00", b"\x00\x01../../etc/passwd\x00octet\x00",
        b"\x00\x01a\x00octet\x00blksize\x0099999999999999999999\x00timeout\x00-1\x00",
    ]
    while True:
        r = rng.random()
        if r < 0.25:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
            continue
        p = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            m = rng.random()
            if m < 0.45 and p:
                i = rng.randrange(len(p))
                p[i] ^= 1 << rng.randrange(8)
            elif m < 0.6 and p:
                p[rng.randrange(len(p))] = 0
            elif m < 0.8:
                p = p[:rng.randrange(len(p) + 1)]
            else:
                p += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
        yield bytes(p)


def fuzz(host: str, port: int, count: int, seed: int) -> None:
    rng = random.Random(seed)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    for s in socks:
        s.setblocking(False)
    gen = mutations(rng)
    sent = 0
    for i in range(count):
        pkt = next(gen)
        dport = port if rng.random() < 0.7 else rng.randrange(1024, 65536)
        s = socks[i % len(socks)]
        try:
            s.sendto(pkt, (host, dport))
            sent += 1
        except (BlockingIOError, OSError):
            time.sleep(0.001)
        for s2 in socks:  # drain replies so our buffers never fill
            try:
                while True:
                    s2.recv(65536)
            except (BlockingIOError, OSError):
                pass
        if i % 50 == 0:
            time.sleep(0.01)  # a steady storm over seconds, not a flood that only measures socket buffers
    print(json.dumps({"sent": sent}), flush=True)


def main(argv: list[str]) -> int:
    cmd, host, port = argv[0], argv[1], int(argv[2])
    if cmd == "rrq":
        rrq(host, port, [bytes.fromhex(h) for h in argv[3:]])
    elif cmd == "silent":
        silent(host, port, argv[3], float(argv[4]), argv[5:])
    elif cmd == "fuzz":
        fuzz(host, port, int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
