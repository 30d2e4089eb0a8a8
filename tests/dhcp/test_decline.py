"""Forged DHCPDECLINEs (issue 13, point 5): only the holder of a lease may have its address quarantined."""
from __future__ import annotations

import pytest
from test_server import PY, dhcp_config, lease_rows, metrics, udp_client, wait_until

pytestmark = pytest.mark.netns

RESERVED_MAC, RESERVED_IP = "52:54:00:77:de:21", "10.77.0.33"

SEND_DECLINES = r"""
import sys
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, sendp
conf.verb = 0
mac = sys.argv[1]
chaddr = bytes.fromhex(mac.replace(":", ""))
pkts = [Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(op=1, chaddr=chaddr, xid=0x5000 + i)
        / DHCP(options=[("message-type", "decline"), ("requested_addr", ip), ("server_id", "10.77.0.1"), "end"])
        for i, ip in enumerate(sys.argv[2:])]
for _ in range(10):  # ten rounds, as in the report
    sendp(pkts, iface="eth0")
print(len(pkts) * 10)
"""


def test_stranger_declines_quarantine_nothing(lab, bootd_daemon, tmp_path):
    d = bootd_daemon(dhcp_config(allow_unknown=False, hosts=[
        {"mac": RESERVED_MAC, "name": "pc-res", "ip": RESERVED_IP},
        {"mac": "52:54:00:77:de:22", "name": "pc-pool"}]), ns=lab.server)
    res = lab.add_client(mac=RESERVED_MAC)
    r = res.ns.run(["udhcpc", "-n", "-q", "-f", "-i", "eth0", "-s", "/bin/true", "-t", "5", "-T", "1"],
                   check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (RESERVED_IP, RESERVED_MAC, "bound") in lease_rows(d)
    stranger = lab.add_client()
    targets = [RESERVED_IP] + [f"10.77.0.{n}" for n in range(100, 200)]
    out = stranger.ns.run([PY, "-c", SEND_DECLINES, stranger.mac, *targets], timeout=120)
    assert int(out.stdout.split()[-1]) == 10 * len(targets)
    def handled() -> tuple[float, float]:  # (declines judged, declines dropped by the per-MAC limit)
        m = metrics(d)
        judged = (m.get("ignored{reason=decline-lease-not-found}", 0)
                  + m.get("ignored{reason=decline-lease-mismatch}", 0))
        return judged, m.get("dropped{reason=rate-limit}", 0)
    assert wait_until(lambda: sum(handled()) >= 10 * len(targets), timeout=30), metrics(d)
    assert handled()[0] >= 30  # the stranger's burst reached the policy (and the rest was cut)
    assert not [row for row in lease_rows(d) if row[2] == "declined"]
    # the pool still serves a known host, the reserved host still has its address
    known = lab.add_client(address="10.77.0.60")
    assert udp_client(known, "52:54:00:77:de:22")[0]["ack"] == "10.77.0.100"
    r = res.ns.run(["udhcpc", "-n", "-q", "-f", "-i", "eth0", "-s", "/bin/true", "-t", "5", "-T", "1"],
                   check=False, timeout=60)
    assert r.returncode == 0 and RESERVED_IP in r.stdout + r.stderr, r.stderr
    # survives a restart too: nothing was persisted as declined
    d.stop()
    d.start()
    assert not [row for row in lease_rows(d) if row[2] == "declined"]
