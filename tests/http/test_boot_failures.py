"""Failures an admin can see (issue 16): a failed boot step is a boot event with its reason and a
warning naming the host; `bootctl hosts` / `bootctl rooms` show state and last error; start and
reload warn about a missing kernel/initrd and about another DHCP server on a served interface.

One real daemon (full DHCP mode on the lab bridge) for the module; PCs are client namespaces with
curl; the other DHCP server is a real dnsmasq the test starts in a namespace of its own on the bridge
and kills by its pid.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netns import Lab  # noqa: E402
from support import BootdProcess, have  # noqa: E402

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0 or not have("curl"), reason="needs root and curl")]

PC01_IP = "10.77.0.21"  # room1, fetches the missing kernel over HTTP
PC02_IP = "10.77.0.22"  # room1, fetches it over TFTP
PC03_IP = "10.77.0.23"  # room2, boots fine (kernel and initrd over HTTP)
PC04_IP = "10.77.0.24"  # room3, gets a NAK and declines its address
ROGUE_IP = "10.77.0.250"  # the other DHCP server (dnsmasq)


class Env:
    lab: Lab
    bootd: BootdProcess
    pcs: dict
    workdir: Path

    @property
    def base(self) -> str:
        return f"http://{self.lab.server_ip}:8080"

    def curl(self, pc: str, *args: str):
        return self.pcs[pc].ns.run(["curl", "-sS", "--max-time", "20", *args], check=False, text=False)

    def status(self) -> dict:
        return self.bootd.api.get("/api/v1/status")

    def checks(self) -> dict:
        return next(s for s in self.status()["services"] if s["name"] == "checks")

    def wait_dhcp_check(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.checks()
            if st["other_dhcp_check"] == "done":
                return self.status()
            time.sleep(0.2)
        raise AssertionError(f"the other-DHCP check did not finish: {self.checks()}")

    def reload(self) -> None:
        r = self.bootd.bootctl("reload", check=True)
        assert "reloaded" in r.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    e = Env()
    e.lab = Lab()
    try:
        e.pcs = {"pc01": e.lab.add_client(address=PC01_IP), "pc02": e.lab.add_client(address=PC02_IP),
                 "pc03": e.lab.add_client(address=PC03_IP), "pc04": e.lab.add_client()}
        e.workdir = wd = tmp_path_factory.mktemp("bootd-failures")
        boot = wd / "storage" / "boot"
        boot.mkdir(parents=True)
        (boot / "vmlinuz").write_bytes(os.urandom(200_000))
        (boot / "initrd.img").write_bytes(os.urandom(300_000))
        config = {
            "interfaces": [{"name": "br0", "address": f"{e.lab.server_ip}/24"}],
            "http": {"port": 8080},
            "tftp": {"enabled": True, "timeout": 0.2, "retries": 2},
            "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.150"}],
                     "router_advertisements": False},
            "storage": {"directory": str(wd / "storage")},
            "images": [{"name": "broken", "kernel": "vmlinuz-x", "initrd": "initrd.img"},
                       {"name": "good", "kernel": "vmlinuz", "initrd": "initrd.img"}],
            "groups": [{"name": "room1", "images": ["broken"]}, {"name": "room2", "images": ["good"]},
                       {"name": "room3", "images": ["good"]}],
            "hosts": [{"mac": e.pcs["pc01"].mac, "name": "pc01", "ip": PC01_IP, "group": "room1"},
                      {"mac": e.pcs["pc02"].mac, "name": "pc02", "ip": PC02_IP, "group": "room1"},
                      {"mac": e.pcs["pc03"].mac, "name": "pc03", "ip": PC03_IP, "group": "room2"},
                      {"mac": e.pcs["pc04"].mac, "name": "pc04", "ip": PC04_IP, "group": "room3"}],
        }
        e.bootd = BootdProcess(wd, config, ns=e.lab.server)
        e.bootd.start()
        yield e
    finally:
        if getattr(e, "bootd", None) is not None:
            e.bootd.close()
        e.lab.close()


def _warning_lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and needle in line]


def test_missing_kernel_over_http_is_a_failed_step(env):
    r = env.curl("pc01", "-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/boot/files/vmlinuz-x")
    assert r.stdout == b"404"
    reason = "kernel vmlinuz-x: not found over HTTP"
    out = env.bootd.bootctl("hosts", "pc01", check=True).stdout
    assert reason in out, out
    assert "state failed" in out, out
    host = env.bootd.api.get("/api/v1/hosts/pc01")
    assert host["state"] == "failed" and host["last_error"] == reason
    assert host["last_seen"] is not None and host["last_ip"] == PC01_IP  # seen, if only over HTTP
    failed = [ev for ev in host["events"] if ev["kind"] == "failed"]
    assert failed and failed[-1]["detail"]["reason"] == reason and failed[-1]["detail"]["step"] == "kernel"
    lines = _warning_lines(env.bootd.log(), reason)
    assert lines and all("pc01" in line for line in lines), env.bootd.log()[-3000:]
    table = env.bootd.bootctl("hosts", check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith("pc01 "))
    assert "failed" in row and reason in row, table


def test_missing_kernel_over_tftp_is_a_failed_step(env):
    r = env.curl("pc02", "-o", "/dev/null", f"tftp://{env.lab.server_ip}/vmlinuz-x")
    assert r.returncode != 0  # curl: TFTP file not found
    reason = "kernel vmlinuz-x: not found over TFTP"
    out = env.bootd.bootctl("hosts", "pc02", check=True).stdout
    assert reason in out and "state failed" in out, out
    lines = _warning_lines(env.bootd.log(), reason)
    assert lines and all("pc02" in line for line in lines), env.bootd.log()[-3000:]


SILENT_TFTP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"\x00\x01initrd.img\x00octet\x00", (sys.argv[1], 69))
n = 0
try:
    while True:  # the first block and its retransmissions; never an ACK
        s.recvfrom(65536)
        n += 1
except socket.timeout:
    pass
print(n)
"""


def test_a_silent_tftp_client_is_a_timeout(env):
    r = env.pcs["pc02"].ns.run([sys.executable, "-c", SILENT_TFTP, env.lab.server_ip], timeout=60)
    assert int(r.stdout.split()[-1]) >= 2  # the block and at least one retransmission
    reason = "initrd initrd.img: client timeout over TFTP after 0 bytes"
    host = env.bootd.api.get("/api/v1/hosts/pc02")
    assert host["last_error"] == reason, host["events"][-3:]
    assert any(reason in line and "pc02" in line for line in _warning_lines(env.bootd.log(), reason))


def test_a_good_boot_is_up_with_its_duration(env):
    for name in ("vmlinuz", "initrd.img"):
        r = env.curl("pc03", "-f", "-o", "/dev/null", f"{env.base}/boot/files/{name}")
        assert r.returncode == 0, r.stderr
    host = env.bootd.api.get("/api/v1/hosts/pc03")
    assert host["state"] == "up", host
    assert host["last_error"] is None
    assert host["last_boot_duration"] is not None and host["last_boot_duration"] >= 0


def test_rooms_count_states(env):
    # the PCs of the tests above: pc01 and pc02 failed (room1), pc03 up (room2)
    for pc, url in (("pc01", f"{env.base}/boot/files/vmlinuz-x"), ("pc02", f"tftp://{env.lab.server_ip}/vmlinuz-x")):
        env.curl(pc, "-o", "/dev/null", url)
    for name in ("vmlinuz", "initrd.img"):
        env.curl("pc03", "-f", "-o", "/dev/null", f"{env.base}/boot/files/{name}")
    rooms = {r["room"]: r for r in json.loads(env.bootd.bootctl("--json", "rooms", check=True).stdout)["rooms"]}
    assert rooms["room1"]["hosts"] == 2 and rooms["room1"]["states"]["failed"] == 2, rooms
    assert sorted(f["name"] for f in rooms["room1"]["failed"]) == ["pc01", "pc02"]
    assert rooms["room2"]["hosts"] == 1 and rooms["room2"]["states"]["up"] == 1 and rooms["room2"]["up_on"] == {"-": 1}
    text = env.bootd.bootctl("rooms", check=True).stdout
    assert "room1: 2 PCs, 0 up, 0 booting, 2 failed, 0 off" in text, text
    assert "failed pc01: kernel vmlinuz-x: not found over HTTP" in text, text
    assert "room2: 1 PCs, 1 up (1 on -)" in text, text


def test_missing_kernel_in_config_is_a_status_warning(env):
    warnings = env.status()["warnings"]
    assert any("image broken: kernel vmlinuz-x is missing" in w for w in warnings), warnings
    assert not any("image good" in w for w in warnings), warnings
    assert "image broken: kernel vmlinuz-x is missing" in env.bootd.bootctl("status", check=True).stdout
    assert _warning_lines(env.bootd.log(), "image broken: kernel vmlinuz-x is missing")


SEND_DHCP = r"""
import sys
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, sendp
conf.verb = 0
mac, kind, ip = sys.argv[1:4]
chaddr = bytes.fromhex(mac.replace(":", ""))
opts = [("message-type", kind), ("requested_addr", ip), ("client_id", b"\x01" + chaddr)]
if kind == "decline":
    opts.append(("server_id", "10.77.0.1"))
sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
      / BOOTP(op=1, chaddr=chaddr, xid=0x6116) / DHCP(options=opts + ["end"]), iface="eth0")
"""


def _wait_failure(env, host: str, reason: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        h = env.bootd.api.get(f"/api/v1/hosts/{host}")
        if h["last_error"] == reason:
            return h
        time.sleep(0.2)
    raise AssertionError(f"{host}: no failure {reason!r}: {env.bootd.api.get(f'/api/v1/hosts/{host}')}")


def test_dhcp_nak_and_decline_are_failed_steps(env):
    pc = env.pcs["pc04"]
    pc.ns.run([sys.executable, "-c", SEND_DHCP, pc.mac, "request", "10.99.0.5"])
    reason = "dhcp: NAK for 10.99.0.5 (wrong network)"
    h = _wait_failure(env, "pc04", reason)
    assert h["state"] == "failed"
    assert _warning_lines(env.bootd.log(), reason) and all("pc04" in line for line in
                                                           _warning_lines(env.bootd.log(), reason))
    # a real client gets its reserved address, then declines it (as after an ARP conflict)
    r = pc.ns.run(["udhcpc", "-n", "-q", "-f", "-i", "eth0", "-s", "/bin/true", "-t", "5", "-T", "1"],
                  check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    pc.ns.run([sys.executable, "-c", SEND_DHCP, pc.mac, "decline", PC04_IP])
    reason = f"dhcp: the PC declined {PC04_IP} (another machine answers on that address)"
    _wait_failure(env, "pc04", reason)
    assert "pc04" in _warning_lines(env.bootd.log(), reason)[0]


def test_another_dhcp_server_is_a_status_warning(env, tmp_path):
    st = env.wait_dhcp_check()
    assert not any("another DHCP server" in w for w in st["warnings"]), st["warnings"]
    rogue = env.lab.add_client(address=ROGUE_IP)
    proc = rogue.ns.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv",
                           "--no-hosts", "--interface=eth0", "--bind-interfaces",
                           "--dhcp-range=10.77.0.200,10.77.0.220,255.255.255.0,1h",
                           f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'pid'}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        env.reload()
        st = env.wait_dhcp_check()
        assert any(f"another DHCP server answers on br0: {ROGUE_IP}" in w for w in st["warnings"]), st["warnings"]
        assert f"another DHCP server answers on br0: {ROGUE_IP}" in env.bootd.bootctl("status", check=True).stdout
        assert _warning_lines(env.bootd.log(), f"another DHCP server answers on br0: {ROGUE_IP}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    env.reload()
    st = env.wait_dhcp_check()
    assert not any("another DHCP server" in w for w in st["warnings"]), st["warnings"]
    # bootd's own server saw its probes (start and two reloads) and left them alone: no offer, no host
    dhcp = env.bootd.api.get("/api/v1/metrics")["dhcp"]
    assert dhcp.get("ignored{reason=own-probe}", 0) >= 3, dhcp
    macs = {h["mac"] for h in env.bootd.api.get("/api/v1/hosts")["hosts"]}
    assert macs == {pc.mac for pc in env.pcs.values()}, macs
