"""Who is at an address (bootd/peers.py) decides whose disk, menu and client configs a peer gets: only a
live binding counts. Real bootd in a lab namespace, real DHCP clients (udhcpc), curl, nbdinfo and libnbd
in client namespaces; the stranger is a second namespace that ends up on the address the host had."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from nbdtest import make_base
from support import state_rows

pytestmark = pytest.mark.netns

SERVER = "10.77.0.1"
ADDR = "10.77.0.100"  # the pool's only address: whoever asks next gets the host's old one

OPEN = textwrap.dedent("""
    import sys, nbd
    h = nbd.NBD()
    try:
        h.connect_uri(sys.argv[1])
    except nbd.Error as e:
        print("REFUSED", e); sys.exit(0)
    print("OPEN", h.get_size())
""")


def lab_config(mode: str, a_mac: str, tmp_path: Path) -> dict:
    boot = tmp_path / "boot"
    (boot / "deb").mkdir(parents=True)
    (boot / "deb" / "vmlinuz").write_bytes(b"k" * 1024)
    (boot / "deb" / "initrd.img").write_bytes(b"i" * 1024)
    dhcp = {"mode": mode}
    if mode == "full":
        dhcp.update(lease_time=600, pools=[{"interface": "br0", "start": ADDR, "end": ADDR, "router": SERVER}])
    return {"interfaces": [{"name": "br0", "address": f"{SERVER}/24"}],
            "dhcp": dhcp, "tftp": {"enabled": True, "root": str(boot)}, "http": {"port": 8080},
            "images": [{"name": "deb", "kernel": "deb/vmlinuz", "initrd": "deb/initrd.img"}],
            "groups": [{"name": "room1", "images": ["deb"],
                        "clients": {"instances": [{"name": "deb", "disk_uri": f"nbd://{SERVER}:10809/fixedDeb"}]}}],
            "hosts": [{"mac": a_mac, "name": "pc-a", "group": "room1"}]}


def dhcp_hook(tmp_path: Path) -> Path:
    """udhcpc's script: configure the leased address on eth0, drop it on deconfig."""
    p = tmp_path / "udhcpc.sh"
    p.write_text("#!/bin/sh\ncase \"$1\" in\n"
                 "  bound|renew) ip addr flush dev $interface; ip addr add $ip/24 dev $interface ;;\n"
                 "  deconfig) ip addr flush dev $interface ;;\nesac\nexit 0\n")
    p.chmod(0o755)
    return p


def ipv4_of(client) -> list[str]:
    out = client.ns.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def lease_rows(d) -> list[tuple]:
    return state_rows(d.storage / "state.db", "SELECT ip, mac, state FROM leases ORDER BY ip")


def wait_until(pred, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


def bootctl_json(d, *args):
    r = d.bootctl("--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def listing(client) -> str:
    r = client.ns.run(["nbdinfo", "--list", "--json", f"nbd://{SERVER}:10809"], check=False)
    return r.stdout + r.stderr


def nbd_open(client, uri: str) -> str:
    return client.ns.run([sys.executable, "-c", OPEN, uri], timeout=60).stdout


def curl(client, path: str) -> tuple[int, str]:
    r = client.ns.run(["curl", "-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}",
                       f"http://{SERVER}:8080{path}"], check=False, timeout=60)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def tftp_get(client, name: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"tftp-{time.monotonic_ns()}"
    client.ns.run(["tftp", SERVER, "-c", "get", name, str(out)], check=False, timeout=60)
    return out.read_bytes() if out.exists() else b""


def hold_address(client, hook: Path, mode: str):
    """The client gets ADDR: from bootd's DHCP (full mode: udhcpc stays running, returned) or set by hand
    (off mode: no lease at all)."""
    proc = None
    if mode == "full":
        proc = client.ns.popen(["udhcpc", "-f", "-i", "eth0", "-s", str(hook), "-t", "5", "-T", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: ipv4_of(client) == [ADDR], timeout=30)
    else:
        client.ns.run(["ip", "addr", "add", f"{ADDR}/24", "dev", "eth0"])
    assert ipv4_of(client) == [ADDR]
    client.ns.run(["ping", "-c", "1", "-W", "2", SERVER])  # the server's neighbour entry is this client's
    return proc


def leave(client, dhcp_client, d) -> None:
    """The host goes away: releases its lease (SIGUSR2 to udhcpc: DHCPRELEASE), drops its address and link."""
    if dhcp_client is not None:
        dhcp_client.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: (ADDR, client.mac, "released") in lease_rows(d)), lease_rows(d)
        dhcp_client.terminate()
        dhcp_client.wait(timeout=10)
    client.ns.run(["ip", "addr", "flush", "dev", "eth0"])
    client.ns.run(["ip", "link", "set", "eth0", "down"])


@pytest.mark.parametrize("mode", ["full", "off"])
def test_the_next_holder_of_an_address_gets_nothing_of_the_last_one(lab, bootd_daemon, tmp_path, mode):
    """Host A boots (disk export, menu) at ADDR, then leaves; stranger B gets ADDR (from bootd itself in full
    mode; by hand in off mode, where only hosts.last_ip remembered A). B must not list or open A's export,
    nor fetch A's menu (a new boot) or its client configs, over HTTP or TFTP."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    hook = dhcp_hook(tmp_path)
    a = lab.add_client()
    b = lab.add_client()  # not a configured host
    d = bootd_daemon(lab_config(mode, a.mac, tmp_path), ns=lab.server)

    a_dhcp = hold_address(a, hook, mode)
    if mode == "full":
        assert (ADDR, a.mac, "bound") in lease_rows(d)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    # A itself: its export, its menu (this also records ADDR as A's last address), its configs
    assert [e["export-name"] for e in json.loads(listing(a))["exports"]] == [ea["name"]]
    assert nbd_open(a, ea["uri"]).startswith("OPEN")
    code, menu = curl(a, f"/boot/{a.mac}.ipxe")
    assert code == 200 and "#!ipxe" in menu
    code, body = curl(a, "/clients/pc-a/index.json")
    assert code == 200 and "fixedDeb" in body
    assert d.api.get(f"/api/v1/hosts/{a.mac}")["last_ip"] == ADDR

    leave(a, a_dhcp, d)
    hold_address(b, hook, mode)
    if mode == "full":
        assert (ADDR, b.mac, "bound") in lease_rows(d)  # bootd itself gave B the address

    out = listing(b)
    assert ea["name"] not in out, out
    assert nbd_open(b, ea["uri"]).startswith("REFUSED")
    scripts = len([e for e in d.api.get(f"/api/v1/hosts/{a.mac}")["events"] if e["kind"] == "script"])
    code, body = curl(b, f"/boot/{a.mac}.ipxe")
    assert code == 403 and ea["name"] not in body and "#!ipxe" not in body
    for key in ("pc-a", a.mac, a.mac.replace(":", "-").upper(), a.mac.replace(":", "")):
        code, body = curl(b, f"/clients/{key}/index.json")
        assert code == 403 and "fixedDeb" not in body, (key, code, body)
    assert tftp_get(b, f"pxelinux.cfg/01-{a.mac.replace(':', '-')}", tmp_path) == b""
    assert tftp_get(b, f"clients/{a.mac.replace(':', '-')}/index", tmp_path) == b""
    # B's refused menu fetches started no boot of A
    assert len([e for e in d.api.get(f"/api/v1/hosts/{a.mac}")["events"] if e["kind"] == "script"]) == scripts
    assert bootctl_json(d, "metrics")["nbd"]["refused{reason=not-the-host}"] >= 1


def test_a_neighbour_entry_that_contradicts_the_lease_is_refused(lab, bootd_daemon, tmp_path):
    """A holds a live lease on ADDR and goes quiet; B (another MAC) answers on ADDR. The lease says A, the
    kernel's neighbour table says B: nobody is trusted, neither for A's disk nor its menu. When A is back
    on its address (and B gone) A gets everything again."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    hook = dhcp_hook(tmp_path)
    a = lab.add_client()
    b = lab.add_client()
    d = bootd_daemon(lab_config("full", a.mac, tmp_path), ns=lab.server)
    hold_address(a, hook, "full")
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    assert nbd_open(a, ea["uri"]).startswith("OPEN")

    a.ns.run(["ip", "link", "set", "eth0", "down"])  # A quiet, its lease live
    b.ns.run(["ip", "addr", "add", f"{ADDR}/24", "dev", "eth0"])
    b.ns.run(["ping", "-c", "1", "-W", "2", SERVER])
    assert (ADDR, a.mac, "bound") in lease_rows(d)

    out = listing(b)
    assert ea["name"] not in out, out
    assert nbd_open(b, ea["uri"]).startswith("REFUSED")
    code, body = curl(b, f"/boot/{a.mac}.ipxe")
    assert code == 403 and "#!ipxe" not in body
    code, body = curl(b, "/clients/pc-a/index.json")
    assert code == 403 and "fixedDeb" not in body
    assert tftp_get(b, f"pxelinux.cfg/01-{a.mac.replace(':', '-')}", tmp_path) == b""
    assert "bindings disagree" in d.log()

    # B leaves, A is back: the lease and the neighbour table agree again
    b.ns.run(["ip", "link", "set", "eth0", "down"])
    a.ns.run(["ip", "link", "set", "eth0", "up"])
    deadline = time.monotonic() + 20
    while a.ns.run(["ping", "-c", "1", "-W", "1", SERVER], check=False).returncode != 0:
        assert time.monotonic() < deadline, "A cannot reach the server again"
    assert nbd_open(a, ea["uri"]).startswith("OPEN")
    code, menu = curl(a, f"/boot/{a.mac}.ipxe")
    assert code == 200 and "#!ipxe" in menu
