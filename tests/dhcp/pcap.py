"""Read DHCP payloads out of pcap files (the golden captures) without scapy: Ethernet/IPv4/UDP only."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass
class UdpPacket:
    ts: float
    src: tuple[str, int]
    dst: tuple[str, int]
    src_mac: str
    payload: bytes


def read_udp(path: str | Path) -> list[UdpPacket]:
    data = Path(path).read_bytes()
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        end, nano = "<", False
    elif magic == b"\xa1\xb2\xc3\xd4":
        end, nano = ">", False
    elif magic == b"\x4d\x3c\xb2\xa1":
        end, nano = "<", True
    else:
        raise ValueError(f"{path}: not a classic pcap file (use tshark -F pcap)")
    linktype = struct.unpack(end + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet")
    out, i = [], 24
    while i + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack(end + "IIII", data[i:i + 16])
        frame = data[i + 16:i + 16 + incl]
        i += 16 + incl
        if len(frame) < 14:
            continue
        etype = struct.unpack("!H", frame[12:14])[0]
        off = 14
        if etype == 0x8100:
            etype = struct.unpack("!H", frame[16:18])[0]
            off = 18
        if etype != 0x0800:
            continue
        ip = frame[off:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        udp = ip[ihl:total]
        sport, dport, ulen = struct.unpack("!HHH", udp[:6])
        src_ip = ".".join(map(str, ip[12:16]))
        dst_ip = ".".join(map(str, ip[16:20]))
        out.append(UdpPacket(sec + frac / (1e9 if nano else 1e6), (src_ip, sport), (dst_ip, dport),
                             frame[6:12].hex(":"), udp[8:ulen]))
    return out
