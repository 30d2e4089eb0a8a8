"""A PXE client built with scapy, for proxyDHCP tests (run inside a client namespace without address).

    python pxeprobe.py --mac 52:54:00:77:dd:01 --arch 7

Broadcasts a DISCOVER with option 60 PXEClient / 93 / 97, collects every OFFER for a few seconds,
takes the address from the offer that has one (the site's DHCP server), REQUESTs it, configures it,
then asks the proxy (the offer with a boot file and no address) on port 4011, like PXE firmware does.
Prints one JSON object with what each server said.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from bootd.dhcp.codec import DhcpMessage, decode, encode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mac", required=True)
    ap.add_argument("--arch", type=int, default=0)
    ap.add_argument("--ifname", default="eth0")
    ap.add_argument("--wait", type=float, default=3.0)
    a = ap.parse_args()
    from scapy.all import BOOTP, DHCP, IP, UDP, AsyncSniffer, Ether, conf, raw, sendp  # slow import
    conf.verb = 0
    conf.checkIPaddr = False
    chaddr = bytes.fromhex(a.mac.replace(":", ""))
    xid = int.from_bytes(os.urandom(4), "big")
    pxe = [("vendor_class_id", f"PXEClient:Arch:{a.arch:05d}:UNDI:002001".encode()),
           (93, a.arch.to_bytes(2, "big")),
           (97, b"\x00" + bytes(range(16)))]

    def frame(mtype: str, extra: list) -> Ether:
        opts = [("message-type", mtype)] + extra + [("param_req_list", [1, 3, 43, 60, 66, 67]), "end"]
        return (Ether(src=a.mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                / UDP(sport=68, dport=67) / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000) / DHCP(options=opts))

    def collect(pkts) -> list[DhcpMessage]:
        out = []
        for p in pkts:
            if UDP in p and p[UDP].dport == 68:
                m = decode(raw(p[UDP].payload))
                if m.xid == xid and m.op == 2:
                    out.append(m)
        return out

    sn = AsyncSniffer(iface=a.ifname, filter="udp and dst port 68")
    sn.start()
    time.sleep(0.5)
    disc = frame("discover", [])
    disc[DHCP].options = [("message-type", "discover"), ("vendor_class_id", pxe[0][1])] + \
        [(93, pxe[1][1]), (97, pxe[2][1])] + [("param_req_list", [1, 3, 43, 60, 66, 67]), "end"]
    sendp(disc, iface=a.ifname)
    time.sleep(a.wait)
    offers = collect(sn.stop())
    result: dict = {"offers": [{"server": m.server_id, "yiaddr": m.yiaddr, "file": m.boot_file,
                                "vendor": m.vendor_class, "has43": 43 in m.options} for m in offers]}
    addr_offer = next((m for m in offers if m.yiaddr != "0.0.0.0"), None)
    proxy_offer = next((m for m in offers if m.yiaddr == "0.0.0.0" and m.boot_file), None)
    if addr_offer is None:
        print(json.dumps(result))
        return 1
    sn = AsyncSniffer(iface=a.ifname, filter="udp and dst port 68")
    sn.start()
    time.sleep(0.3)
    req = frame("request", [])
    req[DHCP].options = [("message-type", "request"), ("requested_addr", addr_offer.yiaddr),
                         ("server_id", addr_offer.server_id), ("vendor_class_id", pxe[0][1]),
                         (93, pxe[1][1]), (97, pxe[2][1]), "end"]
    sendp(req, iface=a.ifname)
    time.sleep(1.5)
    acks = [m for m in collect(sn.stop()) if m.message_type == 5]
    result["ack"] = acks[0].yiaddr if acks else None
    if not acks or proxy_offer is None:
        print(json.dumps(result))
        return 1
    subprocess.run(["ip", "addr", "add", f"{acks[0].yiaddr}/24", "dev", a.ifname], check=True)
    # the proxyDHCP request on port 4011, from the new address
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 25, a.ifname.encode())
    s.bind((acks[0].yiaddr, 68))
    s.settimeout(3.0)
    preq = DhcpMessage(xid=xid + 1, chaddr=chaddr, ciaddr=acks[0].yiaddr,
                       options={53: b"\x03", 60: pxe[0][1], 93: pxe[1][1], 97: pxe[2][1]})
    s.sendto(encode(preq), (proxy_offer.server_id, 4011))
    try:
        data, src = s.recvfrom(4096)
        m = decode(data)
        result["proxy_ack"] = {"from": src[0], "type": m.message_type, "file": m.boot_file, "siaddr": m.siaddr,
                               "yiaddr": m.yiaddr}
    except socket.timeout:
        result["proxy_ack"] = None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
