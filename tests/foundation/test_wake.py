"""Wake-on-LAN (issue 16): the magic packet codec, and the real daemon sending in a lab namespace to
receivers that read raw frames in client namespaces (as a sleeping NIC does): one packet per host, on
the served interface of the host's subnet, and a room paced at `wake.rate`."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bootd.config import Config
from bootd.wake import magic_packet, parse_magic, plan_targets

HERE = Path(__file__).resolve().parent
PY = sys.executable


def test_magic_packet_golden_bytes_and_parse():
    pkt = magic_packet("52-54-00-AB-CD-EF")
    assert pkt == bytes.fromhex("ffffffffffff" + "525400abcdef" * 16)
    assert parse_magic(pkt) == "52:54:00:ab:cd:ef"
    assert parse_magic(b"\x00junk" + pkt + b"tail") == "52:54:00:ab:cd:ef"  # anywhere in the frame
    mac_with_ff = magic_packet("ff:00:11:22:33:44")
    assert parse_magic(b"\xff" + mac_with_ff) == "ff:00:11:22:33:44"
    assert parse_magic(pkt[:-1]) is None  # truncated
    assert parse_magic(pkt[:6] + bytes.fromhex("525400abcdef") * 15 + bytes(6)) is None  # one copy wrong


def test_plan_targets_picks_the_interface_of_the_host_subnet():
    cfg = Config.model_validate({"interfaces": [{"name": "br0", "address": "10.77.0.1/24"},
                                                {"name": "lab2", "address": "10.88.0.1/16"},
                                                {"name": "p2p", "address": "10.99.0.1/32"}]})
    [t] = plan_targets(cfg, "pc", "52:54:00:00:00:01", ["10.88.3.4"])
    assert (t.interface, t.broadcast) == ("lab2", "10.88.255.255")
    # configured ip outside every served subnet (behind a relay), then a lease on br0: the lease decides
    [t] = plan_targets(cfg, "pc", "52:54:00:00:00:01", ["192.0.2.9", "10.77.0.40"])
    assert (t.interface, t.broadcast) == ("br0", "10.77.0.255")
    every = plan_targets(cfg, "pc", "52:54:00:00:00:01", [])
    assert [(t.interface, t.broadcast) for t in every] == [("br0", "10.77.0.255"), ("lab2", "10.88.255.255"),
                                                          ("p2p", "255.255.255.255")]


class Receiver:
    """wake_receiver.py in a namespace: the magic packets that reached that link."""

    def __init__(self, ns, interface: str = "eth0"):
        self.proc = ns.popen([PY, str(HERE / "wake_receiver.py"), "--interface", interface],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"receiver did not start: {line!r} {self.proc.stderr.read()}"

    def packets(self) -> list[dict]:
        """Stop listening and return what was received."""
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_job(d, job: dict, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = d.api.get(f"/api/v1/wake/{job['id']}")
    assert job["state"] == "done", job
    return job


def lab_config(hosts: list[dict], rate: float = 20.0, dhcp: str = "off") -> dict:
    return {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}, {"name": "lab2", "address": "10.88.0.1/24"}],
            "dhcp": {"mode": dhcp, "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}]},
            "tftp": {"enabled": False}, "nbd": {"enabled": False},
            # HTTP only with DHCP (it serves the iPXE script URL DHCP hands out); lab2 may not exist without it
            "http": {"enabled": dhcp != "off"},
            "wake": {"rate": rate},
            "images": [{"name": "deb"}], "groups": [{"name": "room1", "images": ["deb"]},
                                                    {"name": "empty", "images": ["deb"]}],
            "hosts": hosts}


@pytest.mark.netns
def test_wake_sends_one_packet_per_host_on_its_interface(lab, bootd_daemon):
    room = [{"mac": f"52:54:00:77:01:{i:02x}", "name": f"pc{i:02d}", "ip": f"10.77.0.{20 + i}", "group": "room1"}
            for i in range(1, 4)]
    pc07 = {"mac": "52:54:00:88:00:07", "name": "pc07", "ip": "10.88.0.7"}
    roamer = {"mac": "52:54:00:99:00:09", "name": "roamer"}  # no address known: every served link
    leased = {"mac": "52:54:00:77:05:01", "name": "leased"}  # no configured ip, a lease on br0: br0 only
    lab2_peer = lab.add_interface("lab2", "10.88.0.1/24")
    d = bootd_daemon(lab_config(room + [pc07, roamer, leased], dhcp="full"), ns=lab.server)
    dhcp_client = lab.add_client(address="10.77.0.50")
    r = dhcp_client.ns.run([PY, str(HERE.parent / "dhcp" / "udpclient.py"), "--mac", leased["mac"]], timeout=60)
    assert '"ack": "10.77.0.1' in r.stdout, r.stdout
    room_link = Receiver(lab.add_client().ns)
    other_link = Receiver(lab2_peer)

    r = d.bootctl("wake", "pc07", "roamer", "leased", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "done" and job["sent"] == 4 and job["failed"] == 0
    r = d.bootctl("wake", "--group", "room1", "pc01", "--wait")  # pc01 named twice: still one packet
    assert r.returncode == 0, r.stderr
    assert "3 magic packet(s) for 3 host(s)" in r.stdout and "pc02" in r.stdout

    # unknown host or group: 404 with the reason, nothing sent
    r = d.bootctl("wake", "pc99")
    assert r.returncode == 1 and "no host named or with MAC 'pc99'" in r.stderr
    assert json.loads(d.bootctl("--json", "wake", "pc99").stdout)["status"] == 404  # the status: --json only
    r = d.bootctl("wake", "--group", "room9")
    assert r.returncode == 1 and "no group named 'room9'" in r.stderr
    r = d.bootctl("wake", "--group", "empty")
    assert r.returncode == 1 and "has no hosts" in r.stderr
    r = d.bootctl("wake", "pc01", "pc99")  # all or nothing: pc01 is not woken either
    assert r.returncode == 1
    time.sleep(0.5)  # a packet queued by a refused request would be out by now (rate 20/s)

    on_room, on_other = room_link.packets(), other_link.packets()
    assert Counter(p["mac"] for p in on_room) == {h["mac"]: 1 for h in room + [roamer, leased]}
    assert Counter(p["mac"] for p in on_other) == {pc07["mac"]: 1, roamer["mac"]: 1}
    for p in on_room + on_other:
        assert p["dst"] == "ff:ff:ff:ff:ff:ff" and p["ethertype"] == 0x0800 and p["udp_port"] == 9, p
    sent = d.api.get("/api/v1/metrics")["wake"]
    assert sent["sent{interface=br0}"] == 5 and sent["sent{interface=lab2}"] == 2 and sent["queued"] == 0


@pytest.mark.netns
def test_room_wake_respects_the_rate(lab, bootd_daemon):
    rate, n = 10.0, 12
    room = [{"mac": f"52:54:00:77:02:{i:02x}", "name": f"pc{i:02d}", "ip": f"10.77.0.{100 + i}", "group": "room1"}
            for i in range(n)]
    d = bootd_daemon(lab_config(room, rate=rate), ns=lab.server)
    link = Receiver(lab.add_client().ns)
    job = d.api.post("/api/v1/wake", {"group": "room1"})
    assert job["packets"] == n and job["rate"] == rate
    wait_job(d, job)
    got = link.packets()
    assert Counter(p["mac"] for p in got) == {h["mac"]: 1 for h in room}
    stamps = sorted(p["ts"] for p in got)
    # the limiter's bound, not a speed claim: n packets at `rate`/s cannot arrive within less than (n-1)/rate
    # (kernel receive timestamps; 20 ms for their jitter)
    assert stamps[-1] - stamps[0] >= (n - 1) / rate - 0.02, stamps


@pytest.mark.netns
def test_wake_api_refuses_bad_requests(lab, bootd_daemon):
    d = bootd_daemon(lab_config([{"mac": "52:54:00:77:03:01", "name": "pc01", "ip": "10.77.0.31"}]), ns=lab.server)
    from bootd.cli.api_client import ApiError
    for body, status, reason in [({}, 400, "name hosts or a group"), ({"hosts": "pc01"}, 400, "must be a list"),
                                 ({"group": 7}, 400, "group must be"), ({"hosts": ["nope"]}, 404, "no host named")]:
        with pytest.raises(ApiError) as e:
            d.api.post("/api/v1/wake", body)
        assert e.value.status == status and reason in str(e.value), (body, e.value)
    with pytest.raises(ApiError) as e:
        d.api.get("/api/v1/wake/999")
    assert e.value.status == 404
    assert d.api.get("/api/v1/status")["pid"] == d.proc.pid  # still serving
