"""Send mutated and random DHCP packets at a server (run inside a client namespace).

    python fuzzer.py --target 10.77.0.1 --count 12000 --rate 4000

Three kinds, interleaved: golden captures with random bytes flipped/truncated/extended, scapy's
`fuzz()` of BOOTP/DHCP layers, and random bytes behind a valid header and magic cookie. Prints JSON
with how many of each were sent.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pcap import read_udp  # noqa: E402

MAGIC = b"\x63\x82\x53\x63"


def seeds() -> list[bytes]:
    out = []
    for p in sorted((HERE.parent / "data" / "dhcp").glob("*.pcap")):
        out += [u.payload for u in read_udp(p) if {u.src[1], u.dst[1]} & {67, 68, 4011}]
    return out


def mutate(rnd: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rnd.random()
    if op < 0.5:
        for _ in range(rnd.randint(1, 10)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
    elif op < 0.7:
        b = b[:rnd.randrange(len(b))]
    elif op < 0.85:
        i = rnd.randrange(240, len(b))
        b[i:i] = bytes([rnd.randrange(256), rnd.choice([0, 1, 4, 255])]) + rnd.randbytes(rnd.randrange(0, 40))
    else:
        b += rnd.randbytes(rnd.randrange(1, 1200))
    return bytes(b)


def scapy_fuzz(n: int, rnd: random.Random) -> list[bytes]:
    from scapy.all import BOOTP, DHCP, fuzz, raw  # noqa: import here, scapy is slow to import
    out = []
    for _ in range(n):
        mt = rnd.choice(["discover", "request", "decline", "release", "inform"])
        pkt = fuzz(BOOTP(op=1, chaddr=rnd.randbytes(6)) / DHCP(options=[("message-type", mt), "end"]))
        out.append(raw(pkt))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, default=67)
    ap.add_argument("--count", type=int, default=12000)
    ap.add_argument("--rate", type=float, default=4000.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scapy", type=int, default=1000)
    ap.add_argument("--ifname", default="eth0")
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    base = seeds()
    if not base:  # mutating nothing would only send random bytes: a storm that proves less than it claims
        print("fuzzer: no seed packets in tests/data/dhcp/*.pcap", file=sys.stderr)
        return 2
    fuzzed = scapy_fuzz(a.scapy, rnd)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, a.ifname.encode())  # SO_BINDTODEVICE: broadcasts leave here
    counts = {"seeds": len(base), "mutated": 0, "scapy": 0, "random": 0, "send_errors": 0}
    t0 = time.monotonic()
    for i in range(a.count):
        r = rnd.random()
        if r < 0.6:
            data, kind = mutate(rnd, rnd.choice(base)), "mutated"
        elif r < 0.6 + len(fuzzed) / max(a.count, 1) * 1.5 and fuzzed:
            data, kind = fuzzed.pop(), "scapy"
        else:
            data = b"\x01\x01\x06\x00" + rnd.randbytes(232) + MAGIC + rnd.randbytes(rnd.randrange(0, 600))
            kind = "random"
        dest = ("255.255.255.255" if i % 5 == 0 else a.target, a.port)
        try:
            s.sendto(data[:65000], dest)
            counts[kind] += 1
        except OSError:
            counts["send_errors"] += 1
        ahead = (i + 1) / a.rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    counts["sent"] = counts["mutated"] + counts["scapy"] + counts["random"]
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
