"""A server that could not read its socket for a while (issue 22): the real daemon, stopped with SIGSTOP
while clients send, answers the newest requests first and skips what nobody waits for any more.

The kernel stamps each datagram when it arrives (SO_TIMESTAMPNS), so the daemon knows what waited past
dhcp.stale_after in its queue however long it was away: that DISCOVER's client has retried already.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import dhcp_config, metrics

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]

CLIENT = r"""
import json, socket, sys, time
sys.path.insert(0, sys.argv[1])
from bootd.dhcp.codec import DhcpMessage, DhcpDecodeError, decode, encode
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b"eth0")
s.bind(("0.0.0.0", 68))
def discover(mac, xid):
    m = DhcpMessage(xid=xid, flags=0x8000, chaddr=bytes.fromhex(mac.replace(":", "")), options={53: b"\x01"})
    s.sendto(encode(m), ("255.255.255.255", 67))
discover("52:54:00:77:c0:01", 0x101)          # will have waited 4 s when the server reads it: stale
time.sleep(4.0)
discover("52:54:00:77:c0:02", 0x201)
discover("52:54:00:77:c0:03", 0x301)          # the same client again, new transaction: superseded
discover("52:54:00:77:c0:03", 0x302)
print("SENT", flush=True)
sys.stdin.readline()                          # the server runs again
s.settimeout(0.2)
offers, end = [], time.monotonic() + 4.0
while time.monotonic() < end:
    try:
        m = decode(s.recv(4096))
    except (socket.timeout, DhcpDecodeError):
        continue
    if m.op == 2 and m.message_type == 2:
        offers.append([m.mac, m.xid])
print(json.dumps(offers), flush=True)
"""


def test_stopped_server_answers_the_newest_and_skips_stale_and_superseded(lab, bootd_daemon):
    d = bootd_daemon(dhcp_config(stale_after=2.0), ns=lab.server)  # 2 s to spare for the fresh ones
    c = lab.add_client(address="10.77.0.50")
    d.signal(signal.SIGSTOP)
    try:
        client = c.ns.popen([sys.executable, "-c", CLIENT, str(ROOT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "SENT"
    finally:
        d.signal(signal.SIGCONT)
    client.stdin.write("go\n")
    client.stdin.flush()
    out, _ = client.communicate(timeout=30)
    offers = json.loads(out.strip().splitlines()[-1])
    # the newest first (one sendmmsg, in order); the stale and the superseded DISCOVER got nothing
    assert offers == [["52:54:00:77:c0:03", 0x302], ["52:54:00:77:c0:02", 0x201]], offers
    m = metrics(d)
    assert m.get("dropped{reason=stale}") == 1 and m.get("dropped{reason=superseded}") == 1, m
    assert m["answered{type=OFFER}"] == 2, m
